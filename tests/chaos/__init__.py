"""Fault-injection ("chaos") suite: real worker replicas on a real, restartable Redis."""
