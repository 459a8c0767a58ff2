"""Classifier version 1: softmax(features @ W + b) with this version's fixed weights."""
import numpy as np
import triton_python_backend_utils as pb_utils

VERSION = 1
# Version 1 leans on the first features, version 2 on the last: outputs differ visibly.
_RNG = np.random.default_rng(1000 + VERSION)
WEIGHTS = _RNG.normal(0.0, 1.0, size=(8, 3)).astype(np.float32)
BIAS = np.array([0.5, 0.0, -0.5] if VERSION == 1 else [-0.5, 0.0, 0.5], dtype=np.float32)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            logits = x @ WEIGHTS + BIAS
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
            out = pb_utils.Tensor("probabilities", probs)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
