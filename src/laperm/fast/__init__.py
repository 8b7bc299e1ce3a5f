"""The GPU fast path's engine-side pieces (``laperm train --mode fast`` plugs them in: :mod:`laperm.engine.fast`).

* :mod:`laperm.fast.step` -- :class:`~laperm.fast.step.DeviceStep`: a training step with no host
  synchronisation, replayed from a CUDA graph on CUDA, eager (and identical to the plain loop) on CPU.

Its data source is :class:`laperm.data.device.DeviceBatches`; see docs/gpu.md.
"""
