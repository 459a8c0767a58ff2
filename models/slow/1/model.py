"""Sleeps for the largest DELAY_MS in the batch once, then echoes every request's input."""
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "DELAY_MS").as_numpy() for r in requests]
        time.sleep(max(float(x.max()) for x in inputs) / 1000.0)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", x)]) for x in inputs]
