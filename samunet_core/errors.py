"""Errors the user can act on. The CLI prints them without a traceback and exits with status 2."""


class SamunetError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


class CheckpointError(SamunetError):
    """A weights file is missing, corrupt, of the wrong architecture or fails its checksum."""


class InputError(SamunetError):
    """An image, volume, prompt file or manifest cannot be used as given."""
