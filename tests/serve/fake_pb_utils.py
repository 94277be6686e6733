"""A stand-in for Triton's ``triton_python_backend_utils`` (python_backend src/resources), enough to run an
exported ``model.py`` outside Triton: tensors, requests with response senders, responses and errors."""

import json
import threading

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    def __init__(self, message, code=0):
        self._message = message

    def message(self):
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None, parameters=None):
        self.output_tensors, self.error = output_tensors or [], error

    def output(self, name):
        return next((t.as_numpy() for t in self.output_tensors if t.name() == name), None)


class ResponseSender:
    def __init__(self, cancel_after=None):
        self.responses, self.final_flags, self.cancel_after = [], 0, cancel_after
        self.done = threading.Event()

    def send(self, response=None, flags=0):
        assert self.final_flags == 0, "a response after the FINAL flag"
        if response is not None:
            self.responses.append(response)
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.final_flags += 1
            self.done.set()

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.responses) >= self.cancel_after


class InferenceRequest:
    def __init__(self, inputs, parameters=None, sender=None):
        self.inputs, self._parameters, self.sender = inputs, parameters or {}, sender or ResponseSender()

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return json.dumps(self._parameters)


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)
