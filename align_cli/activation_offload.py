"""`training.offload_activations`: with gradient checkpointing, the tensors the decoder saves for backward (each
checkpointed layer's input, the hidden states) wait in pinned CPU memory between forward and backward.

Under checkpointing a decoder layer keeps only its input for backward (it recomputes the rest), but that is one
`[tokens, hidden]` tensor per layer, all alive when backward starts, where the peak is. Offloading them leaves the
one or two layers backward is working on.

Why not `torch.autograd.graph.save_on_cpu(pin_memory=True)` around the forward: it moves every saved tensor,
parameters included (the LM head's weight, 0.5 GiB at Llama-3.2-1B, would cross the bus twice per step), copies on
the compute stream (each copy adds its time to the step), and brings each tensor back only when backward asks for
it (the backward waits for each copy). `ActivationOffload` instead:

- acts only inside the decoder's forward (a forward pre-hook pushes its saved-tensor hooks, a forward hook pops
  them), so the LM head and the loss keep their tensors on the GPU; inside a checkpointed layer the checkpoint's
  own hooks take over, so what reaches these hooks is what the checkpoint keeps: the layer's inputs;
- keeps on the device what is not worth a copy: parameters and buffers (and views of them), tensors under
  `MIN_BYTES`, non-contiguous or non-strided tensors, and tensor subclasses (DTensor, ...);
- copies on its own CUDA stream (device to host after the compute stream has produced the tensor, which is freed
  once that copy has run), and in backward, when one layer's input is brought back, starts bringing back the layer
  before it, so the copy overlaps that layer's recomputation and backward.

The values are unchanged (copies there and back), so training is bit-identical with and without it
(tests/test_memory_levers.py). On the CPU it only copies (there is nowhere to move to); it exists for CUDA.
"""

from __future__ import annotations

import weakref

import torch

from .models import decoder

MIN_BYTES = 1 << 20  # smaller tensors stay: the copy's latency would cost more than their memory is worth


class _Offloaded:
    """One saved tensor in host memory, and its copy back to the device once started."""

    __slots__ = ("host", "device", "previous", "on_device", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, previous):
        self.host, self.device, self.previous = host, device, previous
        self.on_device: torch.Tensor | None = None
        self.ready = None  # the CUDA event after which `on_device` holds the values


class ActivationOffload:
    """Saved-tensor hooks around `decoder(model)`'s forward (module docstring). `report()`: what the last forward
    with gradients offloaded; `remove()` takes the hooks off."""

    def __init__(self, model: torch.nn.Module, min_bytes: int | None = None):
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.kept_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.tensors = self.bytes = 0
        self._stream = None
        self._last: weakref.ref | None = None  # the record packed last, to chain the next one to
        self._active: list = []  # saved_tensors_hooks contexts entered by the pre-hook, one per decoder call
        body = decoder(model)
        self._handles = [body.register_forward_pre_hook(self._enter),
                         body.register_forward_hook(self._exit, always_call=True)]

    # ------------------------------------------------------------------ around the decoder's forward

    def _enter(self, _module, _args) -> None:
        hooks = None
        if torch.is_grad_enabled():  # no backward, nothing saved: held-out evaluation, the reference, generation
            hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            hooks.__enter__()
            self.tensors = self.bytes = 0
            self._last = None
        self._active.append(hooks)

    def _exit(self, _module, _args, _output) -> None:
        hooks = self._active.pop()
        if hooks is not None:
            hooks.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def report(self) -> dict:
        return {"tensors": self.tensors, "bytes": self.bytes}

    # ------------------------------------------------------------------ the saved-tensor hooks

    def _worth_moving(self, tensor: torch.Tensor) -> bool:
        return (type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() >= self.min_bytes
                and tensor.untyped_storage().data_ptr() not in self.kept_storages)

    def _copy_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        if not self._worth_moving(tensor):
            return tensor
        cuda = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        if cuda:
            stream = self._copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is reused only after the copy has read it
        else:
            host.copy_(tensor)
        record = _Offloaded(host, tensor.device, self._last)
        self._last = weakref.ref(record)
        self.tensors += 1
        self.bytes += host.numel() * host.element_size()
        return record

    def _start_copy_back(self, record: _Offloaded) -> None:
        if record.device.type != "cuda":
            record.on_device = record.host.to(record.device)
            return
        stream = self._copy_stream(record.device)
        with torch.cuda.stream(stream):
            record.on_device = record.host.to(record.device, non_blocking=True)
            record.ready = stream.record_event()

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.on_device is None:
            self._start_copy_back(packed)
        tensor, ready = packed.on_device, packed.ready
        packed.on_device = packed.ready = None  # autograd holds it now; a second unpack copies again
        earlier = packed.previous() if packed.previous is not None else None
        if earlier is not None and earlier.on_device is None:  # backward runs the layers in reverse order
            self._start_copy_back(earlier)
        if ready is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(ready)
            tensor.record_stream(current)  # allocated on the copy stream, used on this one
        return tensor
