"""Exceptions shared by the backend loaders (``_cpp``, ``_triton``) and the backend choice (``_backend``)."""


class BackendUnavailable(RuntimeError):
    """The selected backend cannot run on these tensors here."""
