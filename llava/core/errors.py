"""Errors a user can act on: each message is one line naming the file, field or limit at fault."""


class LlavaError(Exception):
    """Base class for problems with the user's input; the CLI prints the message alone and exits 1."""


class ImageError(LlavaError):
    """An image cannot be read, is corrupt, or is over a size limit."""


class CheckpointError(LlavaError):
    """A checkpoint folder is missing files or holds weights that do not fit its config."""


class TemplateError(LlavaError):
    """An unknown conversation template, or a conversation the template cannot render."""


class TokenizationMismatchError(LlavaError):
    """Labels cannot be aligned with the tokenized prompt (names the sample)."""


class ContextLengthError(LlavaError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""


class DataError(LlavaError):
    """A training record is malformed (names the file, the record's index and the reason)."""


class TrainConfigError(LlavaError):
    """A training recipe or command-line override is missing, unknown or out of range."""
