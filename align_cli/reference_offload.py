"""`reference.offload`: the frozen reference model's weights wait in pinned host memory and visit the GPU only for
the reference forward of each step.

Why: a live reference is a whole second copy of the model (2.3 GiB at Llama-3.2-1B in bf16) that the step needs
for one forward without autograd, yet it sits on the GPU through the policy's backward, where a step's memory
peaks (benchmarks/RESULTS.md: what is live at the peak). With its weights fetched per step, the peak is the larger
of the backward without them and the policy's forward with them (the reference forward runs after the policy's,
`objective_forward`, when the policy's activations are already held for backward).

How (`HostResidentWeights`): every parameter and buffer of the reference gets a pinned host copy, and its `.data`
points there between forwards. `fetch()` copies them all to the device on a side stream; the trainer's step calls
it before the policy's forward (`objective_forward`), so the copy overlaps that forward. `resident()` (around the
reference forward) waits for the copy, points each tensor at its device copy, and afterwards back at the host
copy; the device copies are freed once the forward's kernels are done (`record_stream`). The weights are the
same bits, so training is bit-identical with and without it (tests/test_reference_offload.py). The cost: one
host-to-device copy of the weights a step (~50 ms for 2.5 GB over PCIe Gen5), hidden behind the policy's
forward where that takes longer. Tied weights (an embedding that is also the LM head) are one tensor, copied
once. On the CPU the copies are host-to-host (there is nowhere to move to): it exists for CUDA.

Not with LoRA's adapter-disabled reference (the reference is the policy itself: nothing to offload) nor under FSDP
/ DeepSpeed (they shard the reference with the policy); config.py and run_setup.py refuse those.
"""

from __future__ import annotations

import contextlib

import torch


class HostResidentWeights:
    """The parameters and buffers of `model` held in host memory, on `device` only inside `resident()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.tensors = list(unique.values())
        for tensor in self.tensors:
            host = tensor.data.to("cpu")
            tensor.data = host.pin_memory() if self.cuda else host.clone()
        self.host = [tensor.data for tensor in self.tensors]
        self.bytes = sum(t.numel() * t.element_size() for t in self.host)
        self._copies: list[torch.Tensor] | None = None
        self._ready = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def fetch(self) -> None:
        """Start copying the weights to the device (a no-op while a fetched copy waits to be used)."""
        if self._copies is not None:
            return
        if not self.cuda:
            self._copies = [host.clone() for host in self.host]
            return
        with torch.cuda.stream(self._stream):
            self._copies = [host.to(self.device, non_blocking=True) for host in self.host]
            self._ready = self._stream.record_event()

    @contextlib.contextmanager
    def resident(self):
        """The weights on the device for the body of the `with` (fetched now if `fetch` was not called)."""
        self.fetch()
        copies, ready = self._copies, self._ready
        self._copies = self._ready = None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for copy in copies:
                copy.record_stream(current)  # allocated on the copy stream, read on this one
        for tensor, copy in zip(self.tensors, copies):
            tensor.data = copy
        try:
            yield
        finally:
            for tensor, host in zip(self.tensors, self.host):
                tensor.data = host
