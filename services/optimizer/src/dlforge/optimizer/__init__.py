"""dlforge optimizer: turns a trained model into fast, spec-checked inference variants.

On ``model.trained`` it exports the classifier to ONNX, builds variants through
:class:`~dlforge.optimizer.compressors.Compressor` plug-ins (ONNX Runtime FP32 with graph
fusion, INT8 static QDQ quantization calibrated on held-out training images, and — where a GPU
and its libraries exist — TensorRT FP16/INT8 engines and ONNX Runtime CUDA/TensorRT providers),
measures each against PyTorch eager (latency, throughput, peak memory, size, accuracy, recall),
chooses the decision threshold that meets the spec's recall on the validation split, checks the
spec, stores the model bundle (:mod:`dlforge.optimizer.bundle`: the chosen model, its preprocessing,
classes, decision rule, spec and spec check, with a manifest of checksums) and emits ``model.optimized``.
"""
