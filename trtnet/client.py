"""A thin client for `trtnet.serve` on tritonclient: the same result objects as `trtnet.Detector`.

    from trtnet.client import Client
    with Client("http://127.0.0.1:8000") as client:          # or grpc://127.0.0.1:8001
        r = client.detect("bus.jpg")[0]                      # Detections: boxes in image pixels
        print(r.labels, r.scores)

Files and encoded bytes (JPEG, PNG) are sent encoded (the server decodes them); numpy arrays as raw uint8 BGR
pixels; one request each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trtnet.api import Classification, Detections, ImageLike, as_list, to_bgr
from trtnet.errors import TrtnetError

NAMES_PARAMETER = "class_names"  # trtnet.serve's model config parameter (serve imports PyTriton; we do not)
ENCODED = (bytes, bytearray, memoryview)  # an encoded image held in memory


def images_of(images: ImageLike | bytes | Sequence) -> list:
    """One image (a path, encoded bytes or an array) or a sequence of them, as a list."""
    return [images] if isinstance(images, ENCODED) else as_list(images)


def protocol_and_address(url: str) -> tuple[str, str]:
    """("http" | "grpc", "host:port") from http://host:port, grpc://host:port or host:port (HTTP)."""
    for scheme in ("http", "grpc"):
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3:].rstrip("/")
    if "://" in url:
        raise TrtnetError(f"{url}: use http://HOST:PORT or grpc://HOST:PORT")
    return "http", url.rstrip("/")


class Client:
    """One connection to a trtnet server; `model` defaults to the server's only model."""

    def __init__(self, url: str = "http://127.0.0.1:8000", model: str | None = None, timeout_s: float = 60.0):
        self.protocol, self.address = protocol_and_address(url)
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self.timeout_s = timeout_s
        kwargs = {} if self.protocol == "grpc" else {"network_timeout": timeout_s, "connection_timeout": timeout_s}
        self._client = self._call(lambda: module.InferenceServerClient(self.address, **kwargs), "connect")
        self.model = model or self._only_model()
        self._config = self._call(lambda: self._model_config(), f"model {self.model}")
        self.outputs = [o["name"] for o in self._config.get("output", [])]
        self.names = self._class_names()

    def _call(self, action, what: str):
        from tritonclient.utils import InferenceServerException

        try:
            return action()
        except InferenceServerException as exc:
            raise TrtnetError(f"{self.address}: {what}: {exc.message()}") from None
        except OSError as exc:
            raise TrtnetError(f"{self.address}: {what}: {exc}") from None

    def _only_model(self) -> str:
        """The model the server's statistics list (trtnet.serve keeps statistics open, the index closed)."""
        stats = self._call(lambda: self.statistics(), "model statistics")
        names = sorted({m["name"] for m in stats.get("model_stats", [])})
        if len(names) != 1:
            raise TrtnetError(f"{self.address} serves {len(names)} models ({', '.join(names)}): pass model=NAME")
        return names[0]

    def statistics(self, model: str = "") -> dict:
        """Triton's inference statistics (batch sizes executed, queue and compute times) as a dict."""
        stats = self._client.get_inference_statistics(model)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(stats, preserving_proto_field_name=True)
        return stats

    def _model_config(self) -> dict:
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(self._client.get_model_config(self.model).config, preserving_proto_field_name=True)
            return config
        return self._client.get_model_config(self.model)

    def _class_names(self) -> list[str]:
        value = self._config.get("parameters", {}).get(NAMES_PARAMETER, {}).get("string_value")
        return [str(n) for n in json.loads(value)] if value else []

    # -- requests

    def _inputs(self, name: str, array: np.ndarray, dtype: str):
        tensor = self._module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, inputs: list) -> dict[str, np.ndarray]:
        outputs = [self._module.InferRequestedOutput(n) for n in self.outputs]
        result = self._call(lambda: self._client.infer(self.model, inputs, outputs=outputs), f"infer {self.model}")
        return {n: result.as_numpy(n) for n in self.outputs}

    def _request(self, image: ImageLike, extra: list) -> tuple[dict[str, np.ndarray], np.ndarray | None, str | None]:
        if isinstance(image, np.ndarray):
            pixels = to_bgr(image)[None]
            return self._infer([self._inputs("pixels", pixels, "UINT8"), *extra]), pixels[0], None
        if isinstance(image, ENCODED):  # a JPEG/PNG file's bytes, decoded on the server
            return self._infer([self._inputs("image", np.array([[bytes(image)]], dtype=object), "BYTES"),
                                *extra]), None, None
        if not isinstance(image, (str, os.PathLike)):
            raise TrtnetError(f"cannot use {type(image).__name__} as an image: pass a path, encoded bytes or a numpy "
                              "BGR array")
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise TrtnetError(f"{path}: no such image file")
        encoded = np.array([[Path(path).read_bytes()]], dtype=object)
        return self._infer([self._inputs("image", encoded, "BYTES"), *extra]), None, path

    def _options(self, conf: float | None, iou: float | None, classes: Sequence[int] | None) -> list:
        extra = []
        for name, value in (("conf", conf), ("iou", iou)):
            if value is not None:
                extra.append(self._inputs(name, np.array([[value]], np.float32), "FP32"))
        if classes is not None:
            extra.append(self._inputs("classes", np.array([list(classes)], np.int32), "INT32"))
        return extra

    def detect(self, images: ImageLike | bytes | Sequence, conf: float | None = None, iou: float | None = None,
               classes: Sequence[int] | None = None) -> list[Detections]:
        """One `Detections` per image, in order; `conf`/`iou`/`classes` narrow the server's settings."""
        extra = self._options(conf, iou, classes)
        results = []
        for image in images_of(images):
            out, pixels, path = self._request(image, extra)
            check_error(out, path)
            k = int(out["count"][0, 0])
            h, w = (int(v) for v in out["shape"][0])
            results.append(Detections(out["boxes"][0, :k].astype(np.float32), out["scores"][0, :k].astype(np.float32),
                                      out["classes"][0, :k].astype(np.int64), self.names, (h, w), path, pixels))
        return results

    def classify(self, images: ImageLike | bytes | Sequence) -> list[Classification]:
        results = []
        for image in images_of(images):
            out, _, path = self._request(image, [])
            check_error(out, path)
            ids = out["topk_ids"][0]
            keep = ids >= 0
            results.append(Classification(ids[keep].astype(np.int64), out["topk_scores"][0][keep], self.names, path))
        return results

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_error(outputs: dict[str, np.ndarray], path: str | None) -> None:
    error = outputs["error"][0, 0]
    error = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
    if error:
        raise TrtnetError(f"{path or 'image'}: the server refused it: {error}")
