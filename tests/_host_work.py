"""Host-work checks shared by the kernel tests: which aten ops and which Triton launches one call makes."""
from torch.utils._python_dispatch import TorchDispatchMode


class RecordAten(TorchDispatchMode):
    """Records every aten op that reaches the dispatcher, except while ``paused`` (inside a Triton launch: under
    the interpreter the launcher copies tensor arguments with aten ops, which a GPU launch does not)."""

    def __init__(self):
        super().__init__()
        self.ops, self.calls, self.paused = [], [], False  # calls: (op, args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func)
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def install_launch_counter(monkeypatch):
    """Wraps ``run`` of Triton's kernel class (JITFunction, or InterpretedFunction under the interpreter), so every
    Triton launch anywhere is counted by name; ``record`` pauses during launches."""
    from rlhf_fast.kernels import losses as kernels

    launches, state = [], {"record": None}
    kernel_cls = type(kernels._finalize_kernel)
    run = kernel_cls.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        rec = state["record"]
        if rec is not None:
            rec.paused = True
        try:
            return run(self, *args, **kwargs)
        finally:
            if rec is not None:
                rec.paused = False

    monkeypatch.setattr(kernel_cls, "run", counted)
    return launches, state


# Ops that allocate or alias memory without touching data; anything else would be device work besides the kernels.
ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default"}
