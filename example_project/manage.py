"""Django's ``manage.py`` for the ``django-beat`` variant of the example project:

    python -m example_project.manage migrate   # django-celery-beat's tables
    python -m example_project.manage shell     # add or change PeriodicTask rows
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.django_beat_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
