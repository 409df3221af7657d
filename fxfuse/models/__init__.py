"""Models and data in and out: model specs, checkpoints and safetensors, atomic writes, data and calibration files, distributed collection, task heads and evaluation."""
