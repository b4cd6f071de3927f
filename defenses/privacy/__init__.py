"""Differential privacy for secfed (docs/privacy.md).

Registry names: trainer ``dp-sgd`` (:mod:`.dpsgd`); client stages ``clip`` (:mod:`.clipping`),
``gaussian-share`` and ``adaptive-clip``; server stages ``central-gaussian`` and ``adaptive-clip``
(:mod:`.dpfedavg`); privacy guards ``dp-fedavg`` and ``dp-sgd`` (:mod:`.guard`). Accounting and
calibration maths: :mod:`.analysis`; noise: :mod:`.noise`.
"""
