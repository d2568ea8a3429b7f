"""The built-in offline demo of the whole RLHF pipeline (``rlhf-fast demo``)."""
