"""Three-class classifier: softmax(features @ W + b), with weights fixed per model version so
versions 1 and 2 answer visibly differently. Version 2's model.py is a link to this file."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        version = int(args["model_version"])
        rng = np.random.default_rng(1000 + version)
        self.weights = rng.normal(0.0, 1.0, size=(8, 3)).astype(np.float32)
        self.bias = np.array([0.5, 0.0, -0.5] if version == 1 else [-0.5, 0.0, 0.5], dtype=np.float32)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            logits = x @ self.weights + self.bias
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probabilities", probs)]))
        return responses
