"""Error types shared by the engine. Bad calls raise ValueError/TypeError subclasses."""


class UnsupportedModelError(ValueError):
    """The model contains an operation SRD has no decomposition rule for.

    The message names the operation and its module path, so a user knows what to canonicalise.
    """


class BrokenModelError(ValueError):
    """The model's own parameters or buffers hold NaN or infinite values (a diverged fine-tune): no input can
    be explained. A ValueError for in-process callers; a server reports it as its own fault, not the caller's."""


class ModelChangedError(RuntimeError):
    """The model's parameters were written while an explanation ran (another thread loaded weights or stepped
    an optimiser): the stages read before and after the write would mix two models, so nothing is returned.
    Not the input's fault: calling again explains the new weights."""


class InputSizeError(ValueError):
    """The input's height and width do not fit the model (a window larger than the map it reaches, or a
    fully connected layer that expects another number of features)."""


# PyTorch's messages when a kernel or pooling window no longer fits the feature map it is applied to (SRD and
# the baselines both turn them into InputSizeError).
TOO_SMALL_MESSAGES = ("too small", "Kernel size can't be greater than actual input size")
