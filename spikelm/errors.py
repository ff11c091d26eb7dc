"""Errors meant for the person at the keyboard: the CLI prints them as one line, without a traceback."""


class SpikeLMError(Exception):
    """Bad input (a missing corpus, a wrong flag value, a corrupt checkpoint): says what is wrong and what to do."""
