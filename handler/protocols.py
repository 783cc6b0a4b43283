"""KServe v1 and Open Inference Protocol (v2) JSON bodies: which images a request carries, and the
answer in the request's own protocol. No torch here.

Why the handler speaks them itself: TorchServe's envelopes (TS_SERVICE_ENVELOPE=kserve/kservev2)
read only the first request of a batch, so an archive that batches breaks behind them. The KServe
bundle turns the envelopes off (serving/kserve.py), and every request of a batch reaches the
handler as ``{"body": <JSON>}`` (parsed by ``decoded_fields`` once its values are counted), on
/predictions/<name> as on /v1 and /v2 paths.

    v1  {"instances": [{"data": "<base64>"} | {"b64": "<base64>"} | "<base64>", ...]}
        -> {"predictions": [<the per-image answer>, ...]}
    v2  {"id": "42", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": ["<base64>", ...]}, ...]}
        -> {"id": "42", "model_name", "model_version", "outputs": [{"name", "datatype", "shape", "data"}, ...],
            "parameters": {"engine": "<the forward pass that answered>"}}
        Several inputs, or a longer BYTES tensor, are several images (in order). ``outputs`` in the
        request picks which outputs come back (all of OUTPUTS by default). Over gRPC (KServe's
        predictor, handler/kserve_predictor.py) the same tensors carry each image's bytes as they are.
Anything else (a raw body, a multipart field, ``{"image": "<base64>"}``) is the plain protocol,
read by handler.preprocessing.image_bytes as before. The v2 binary tensor extension (a JSON head
followed by raw bytes, its length in the ``Inference-Header-Content-Length`` header) is refused
with a 400 that says so: read as a plain body it would only be "not an image".
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from serving.client_text import clipped
from serving.settings import REQUEST_ID_MAX_LENGTH, V2_OUTPUTS

PLAIN, V1, V2 = "plain", "v1", "v2"
# Images in one v1/v2 request (more -> 413); model-config.yaml's handler.max_images_per_request overrides it.
DEFAULT_MAX_IMAGES_PER_REQUEST = 64

# The v2 outputs and their datatypes (serving/settings.py, shared with the adapter's OIP client).
OUTPUTS = V2_OUTPUTS

# Commas a v1/v2 JSON body may hold per image it may carry (refuse_json_flood): an image in a tensor of its own
# with a long shape needs under 40, each output asked 1; the spare covers outputs, parameters, an id.
JSON_COMMAS_PER_IMAGE = 64
JSON_COMMAS_SPARE = 1024


def logged_request_id(headers) -> str:
    """A request's X-Request-ID as a log line names it (TorchServe's worker, KServe's predictor; the adapter
    and KServe's ingress set one on every request): ``headers`` a mapping of str or bytes, any case."""
    for name, value in (headers or {}).items():
        name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if name.lower() == "x-request-id":
            value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return "request " + ascii(value[:REQUEST_ID_MAX_LENGTH])  # (no longer than the adapter keeps one)
    return "a request without X-Request-ID"


class ProtocolError(ValueError):
    """The request's body is not a usable v1/v2 request; ``status`` is the HTTP code its client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ParsedRequest:
    protocol: str                                   # V1 or V2
    images: list[bytes]                             # encoded images, in request order
    where: list[str]                                # where each image sits, for error messages
    request_id: str | None = None                   # v2 "id", echoed in the answer
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))  # v2 outputs to answer


def _b64_image(text, where: str) -> bytes:
    """base64 text (optionally a data: URL) -> bytes; bytes are the image itself (a BYTES element of an
    Open Inference Protocol gRPC request: no JSON, no base64); anything else is the client's mistake."""
    if isinstance(text, (bytes, bytearray)):
        if not text:
            raise ProtocolError(400, f"{where}: empty image")
        return bytes(text)
    if not isinstance(text, str):
        raise ProtocolError(400, f"{where}: expected a base64 string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ProtocolError(400, f"{where}: data: URL must be base64 encoded")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, f"{where}: not base64 image data") from None
    if not data:
        raise ProtocolError(400, f"{where}: empty image")
    return data


# The v2 binary tensor extension's header (tritonclient's binary_data=True, kserve's binary REST).
BINARY_EXTENSION_HEADER = "inference-header-content-length"


def refuse_binary_extension(headers: dict | None) -> None:
    """ProtocolError(400) when the request uses the binary tensor extension (headers: any case)."""
    if headers and any(str(name).lower() == BINARY_EXTENSION_HEADER for name in headers):
        raise ProtocolError(400, "the binary tensor extension (Inference-Header-Content-Length) is not "
                                 "supported: send each image as a BYTES input of base64 strings in JSON")


def json_body(row: dict, max_images: int | None = None):
    """The request's JSON object, or None: an application/json body comes parsed (decoded_fields); a JSON
    body sent as another content type arrives as bytes (an image never starts with '{'), its values
    counted first when ``max_images`` is given (refuse_json_flood)."""
    body = row.get("body")
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray)) and body[:64].lstrip()[:1] == b"{":  # no copy of a big image
        if max_images is not None:
            refuse_json_flood(body, max_images)
        body = json_object(body)
        return body if isinstance(body, dict) else None
    return None


# TorchServe's worker parses an application/json body and decodes a text/* one before the handler runs, unless
# its TS_DECODE_INPUT_REQUEST is "false": the handler turns that off and decodes them here, after the count.
TORCHSERVE_DECODE_SETTING = "TS_DECODE_INPUT_REQUEST"


def decoded_fields(row: dict, headers: dict | None, max_images: int) -> dict:
    """A TorchServe request's fields (``row``: name -> bytes) as its worker would decode them, a JSON
    field's values counted first (refuse_json_flood: TorchServe's own parse of 12 MB of empty arrays held
    a worker 2.3 s, of a cut one 4.5 s): an application/json field parsed (kept as bytes when it is not
    JSON, as TorchServe keeps it), a text/* one as UTF-8 text, any other as it came. ``headers``: the
    request's, where TorchServe files each field's content type under the field's name."""
    decoded = {}
    for name, value in row.items():
        field_headers = (headers or {}).get(name)
        kind = field_headers.get("content-type", "") if isinstance(field_headers, dict) else ""
        kind = kind.split(";")[0].strip().lower()
        if isinstance(value, (bytes, bytearray)) and kind == "application/json":
            refuse_json_flood(value, max_images)
            parsed = json_object(value)  # ProtocolError for NaN, Infinity or deep nesting
            value = value if parsed is None and value.strip() != b"null" else parsed
        elif isinstance(value, (bytes, bytearray)) and kind.startswith("text"):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        decoded[name] = value
    return decoded


def _not_json(constant: str):
    raise ProtocolError(400, f"the body is not valid JSON: {constant} is not a JSON number")


# A number's characters in a request body: shapes, sizes and ids are short, and Python converts a long integer in
# quadratic time (2,925 integers of 4,300 digits, 12 MB, cost 253 ms, twice on KServe's route; session 46).
MAX_NUMBER_CHARACTERS = 32


def _number(convert):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARACTERS:
            raise ProtocolError(400, f"the JSON body has a number of {len(text):,} characters (at most "
                                     f"{MAX_NUMBER_CHARACTERS})")
        value = convert(text)
        if not math.isfinite(value):  # 1e999: infinity, as Infinity itself is refused
            _not_json(text)
        return value
    return parse


_PARSE_INT, _PARSE_FLOAT = _number(int), _number(float)


def json_object(body: bytes):
    """``body`` parsed as JSON, or None when it is not JSON. ProtocolError(400) for what Python's parser
    takes but a server must not: NaN and Infinity (KServe's route fails on them with a 500), numbers of more
    than MAX_NUMBER_CHARACTERS, and nesting deeper than Python's recursion limit (a RecursionError: a 500 too)."""
    try:
        return json.loads(body, parse_constant=_not_json, parse_int=_PARSE_INT, parse_float=_PARSE_FLOAT)
    except ProtocolError:  # a ValueError too
        raise
    except RecursionError:
        raise ProtocolError(400, "the body is JSON nested too deeply") from None
    except ValueError:
        return None


# A v2 tensor's data nested deeper than this is refused: a tensor has a handful of dimensions.
MAX_DATA_DEPTH = 32


def _flatten(data) -> list:
    """A v2 tensor's data, its nested lists flattened in order (without recursion: any depth a JSON
    parser lets through is answered with a 400, not a RecursionError)."""
    flat, levels = [], [iter((data,))]
    while levels:
        for item in levels[-1]:
            if isinstance(item, list):
                if len(levels) > MAX_DATA_DEPTH:
                    raise ProtocolError(400, f"data is nested deeper than {MAX_DATA_DEPTH} levels")
                levels.append(iter(item))
                break
            flat.append(item)
        else:
            levels.pop()
    return flat


def too_many_images(count: int, max_images: int, what: str = "images") -> ProtocolError:
    """The 413 of a request of more than ``max_images`` images (or of ``what`` else that holds them)."""
    return ProtocolError(413, f"{count} {what} in one request, above the limit of {max_images}"
                              f"{'' if what == 'images' else ' images'} (handler.max_images_per_request)")


NAME_SHOWN = 64  # characters of a tensor's name that messages show: the name is the client's, of any length


def shown_name(name) -> str:
    """A tensor's name as messages show it, quoted: cut to NAME_SHOWN characters, in ASCII (serving/client_text.py)."""
    if name is None:
        name = "unnamed"
    if not isinstance(name, str):
        return f"a {type(name).__name__} for a name"
    return clipped(name, NAME_SHOWN, quoted=True)


def shown_names(names: list, most: int = 4) -> str:
    """Names a client sent (outputs asked), as messages show them: the first ``most``, each as shown_name, and how
    many more (an unknown output's name of 11 MB came back whole in the 400, 128 unread ones held 1.4 GB)."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return "[" + ", ".join(shown_name(name) for name in names[:most]) + "]" + more


def tensor_at(n: int, name) -> str:
    """How messages name inputs[n]."""
    return f"inputs[{n}] ({shown_name(name)})"


def too_many_dimensions(at: str, dimensions: int) -> ProtocolError:
    """A v2 shape longer than MAX_DATA_DEPTH: a tensor has a handful of dimensions, and 140 of 10^31 made a product
    Python would not print (a 500) while thousands cost its multiplication seconds."""
    return ProtocolError(400, f"{at}: shape has {dimensions} dimensions, more than {MAX_DATA_DEPTH}")


def unsupported_datatype(at: str, datatype) -> ProtocolError:
    shown = shown_name(datatype) if isinstance(datatype, str) else f"of type {type(datatype).__name__}"
    return ProtocolError(400, f"{at}: datatype {shown} is not supported; send encoded images as datatype BYTES: "
                              "base64 strings in JSON, the bytes themselves over gRPC")


def _parse_v1(body: dict, max_images: int) -> ParsedRequest:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise ProtocolError(400, "'instances' must be a non-empty list of images")
    if len(instances) > max_images:  # counted before any is decoded
        raise too_many_images(len(instances), max_images)
    images, where = [], []
    for n, instance in enumerate(instances):
        at = f"instances[{n}]"
        if isinstance(instance, dict):
            key = next((k for k in ("data", "b64", "image") if k in instance), None)
            if key is None:
                raise ProtocolError(400, f"{at}: expected {{\"data\": \"<base64 image>\"}}")
            at, instance = f"{at}.{key}", instance[key]
            if key == "image" and isinstance(instance, dict) and "b64" in instance:  # TF Serving's binary form
                at, instance = f"{at}.b64", instance["b64"]
        images.append(_b64_image(instance, at))
        where.append(at)
    return ParsedRequest(V1, images, where)


def request_id_refusal(request_id) -> ProtocolError | None:
    """Why a v2 request's ``id`` cannot be echoed, or None: the answer carries it back, so a long one made a small
    answer as large as the body (an 11 MB id, echoed to 100 clients that read nothing: KServe's predictor 0.9 GB up);
    at most REQUEST_ID_MAX_LENGTH characters (serving/settings.py, the adapter's bound on X-Request-ID too)."""
    if request_id is None:
        return None
    if not isinstance(request_id, str):
        return ProtocolError(400, "'id' must be a string")
    if len(request_id) > REQUEST_ID_MAX_LENGTH:
        return ProtocolError(400, f"'id' has {len(request_id)} characters, more than {REQUEST_ID_MAX_LENGTH} "
                                  "(the answer echoes it): send a shorter id")
    return None


def _parse_v2(body: dict, max_images: int) -> ParsedRequest:
    request_id = body.get("id")
    if (refusal := request_id_refusal(request_id)) is not None:  # before anything is read: the cheapest check
        raise refusal
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty list of tensors")
    if len(inputs) > max_images:  # counted before any tensor is read
        raise too_many_images(len(inputs), max_images, "inputs")
    tensors = []  # (where, elements): every tensor's elements counted before any is decoded
    for n, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise ProtocolError(400, f"inputs[{n}] must be an object with name, shape, datatype, data")
        at = tensor_at(n, tensor.get("name"))
        if tensor.get("datatype") != "BYTES":
            raise unsupported_datatype(at, tensor.get("datatype"))
        data = _flatten(tensor.get("data"))
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ProtocolError(400, f"{at}: shape must be a list of sizes, e.g. [{len(data)}]")
        if len(shape) > MAX_DATA_DEPTH:
            raise too_many_dimensions(at, len(shape))
        if (elements := math.prod(shape)) != len(data):
            raise ProtocolError(400, f"{at}: shape {shape} holds {elements} elements, data has {len(data)}")
        tensors.append((at, data))
    if (count := sum(len(data) for _, data in tensors)) > max_images:
        raise too_many_images(count, max_images)
    images, where = [], []
    for at, data in tensors:
        for k, item in enumerate(data):
            where.append(f"{at} data[{k}]")
            images.append(_b64_image(item, where[-1]))
    if not images:
        raise ProtocolError(400, "the request's inputs hold no image")
    outputs = list(OUTPUTS)
    if body.get("outputs") not in (None, []):  # none asked, or an empty list: every output
        asked = body["outputs"]
        names = [o.get("name") if isinstance(o, dict) else None for o in asked] if isinstance(asked, list) else [None]
        unknown = [name for name in names if name not in OUTPUTS]
        if unknown or not names:
            raise ProtocolError(400, f"unknown output(s) {shown_names(unknown)}; this model has {', '.join(OUTPUTS)}")
        if len(set(names)) < len(names):  # each copy would be answered: a small request, an answer without bound
            repeated = [name for name, times in Counter(names).items() if times > 1]
            raise ProtocolError(400, f"output(s) {shown_names(repeated)} asked more than once; ask each at most once")
        outputs = names
    return ParsedRequest(V2, images, where, request_id, outputs)


def parse_request(row: dict, max_images: int, headers: dict | None = None) -> ParsedRequest | None:
    """A v1/v2 request's images, or None for the plain protocol (raw, multipart, {"image": ...}).
    ``headers``: the request's HTTP headers as TorchServe hands them over (a binary request: 400)."""
    refuse_binary_extension(headers)
    body = json_body(row, max_images)
    if body is None or not ("instances" in body or "inputs" in body):
        return None
    # More than max_images images (413) is refused on counts, before any image is decoded.
    return _parse_v1(body, max_images) if "instances" in body else _parse_v2(body, max_images)


_STARTS_AS_JSON = re.compile(rb"[ \t\r\n]*[\[{]")
_STARTS_AS_JSON_TEXT = re.compile(r"[ \t\r\n]*[\[{]")


def _starts_as_json(body: bytes) -> bool:
    """Whether json.loads could read ``body`` as an array or object: it takes UTF-8 with or without a
    byte order mark, and UTF-16/32 (told by a BOM or by the nulls in the first bytes)."""
    encoding = json.detect_encoding(body[:4])
    if encoding == "utf-8":
        return bool(_STARTS_AS_JSON.match(body))
    if encoding == "utf-8-sig":
        return bool(_STARTS_AS_JSON.match(body, len(codecs.BOM_UTF8)))
    # UTF-16/32, rare: decoded whole (as json.loads would), whitespace before the first value has no bound.
    return bool(_STARTS_AS_JSON_TEXT.match(body.decode(encoding, errors="ignore")))


def refuse_json_flood(body: bytes, max_images: int) -> None:
    """ProtocolError(413) for a JSON body of more values than a request of ``max_images`` images holds,
    counted by its commas, then its brackets (C speed, no parsing): within max_request_size, a million tiny values cost
    json.loads seconds holding the GIL and the per-value checks after it far more (benchmarks/RESULTS.md,
    session 26). A comma inside a string counts too: base64 has none, a data: URL one. A body in UTF-16/32
    counts each comma once (its byte 0x2C)."""
    if not _starts_as_json(body):
        return
    limit = max_images * JSON_COMMAS_PER_IMAGE + JSON_COMMAS_SPARE
    if (commas := body.count(b",")) > limit:
        raise ProtocolError(413, f"the JSON body has {commas} commas (values), above the limit of {limit} for a "
                                 f"request of at most {max_images} images (handler.max_images_per_request)")
    # Nested arrays need no comma: 5,101 lists nested 900 deep (9 MB) cost json.loads 2.8 s on the event loop.
    if (containers := body.count(b"[") + body.count(b"{")) > limit:
        raise ProtocolError(413, f"the JSON body has {containers} arrays and objects, above the limit of {limit} for "
                                 f"a request of at most {max_images} images (handler.max_images_per_request)")


def plain_v2_body(content_type: str, body: bytes) -> dict | None:
    """``body`` as a v2 request when it is plain: a JSON content type and a JSON object with exactly the
    types of KServe's own request model (id, inputs of name/shape/datatype/data, outputs by name) and
    no ``parameters`` (KServe reads some, e.g. binary outputs); else None. KServe's predictor answers
    plain bodies itself and hands the rest to KServe's route (handler/kserve_predictor.py). JSON that
    no route can answer raises ProtocolError (json_object)."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        return None
    payload = json_object(body)  # ProtocolError for NaN, Infinity or deep nesting
    if not (isinstance(payload, dict) and set(payload) <= {"id", "inputs", "outputs"}
            and isinstance(payload.get("id", ""), str) and isinstance(payload.get("inputs"), list)):
        return None
    inputs_plain = all(isinstance(t, dict) and set(t) == {"name", "shape", "datatype", "data"}
                       and isinstance(t["name"], str) and isinstance(t["datatype"], str) and isinstance(t["data"], list)
                       and isinstance(t["shape"], list) and all(type(d) is int for d in t["shape"])
                       for t in payload["inputs"])
    outputs = payload.get("outputs", [])
    outputs_plain = isinstance(outputs, list) and all(
        isinstance(o, dict) and set(o) == {"name"} and isinstance(o["name"], str) for o in outputs)
    return payload if inputs_plain and outputs_plain else None


def with_heatmaps(answer: dict, request: ParsedRequest | None, maps: list[str]) -> None:
    """An explanation's heatmaps (one per image) put into its answer as encoded by encode_answer: the plain
    answer's ``heatmap``, each v1 prediction's, or a v2 output ``heatmap`` (BYTES, one per image)."""
    if request is None:
        answer["heatmap"] = maps[0]
    elif request.protocol == V1:
        for prediction, heatmap in zip(answer["predictions"], maps):
            prediction["heatmap"] = heatmap
    else:
        answer["outputs"].append({"name": "heatmap", "datatype": "BYTES", "shape": [len(maps)], "data": maps})


def encode_answer(request: ParsedRequest | None, answers: list[dict], model_name: str, model_version: str):
    """The per-image answers (handler's dicts) in the request's protocol."""
    if request is None:
        return answers[0]
    if request.protocol == V1:
        return {"predictions": answers}
    columns = {
        "label": [a["label"] for a in answers],
        "name": [a["prediction"] for a in answers],
        "index": [a["index"] for a in answers],
        "probability": [a["probability"] for a in answers],
        "unsure": [a["unsure"] for a in answers],
        "topk_label": [t["label"] for a in answers for t in a["topk"]],
        "topk_name": [t["name"] for a in answers for t in a["topk"]],
        "topk_index": [t["index"] for a in answers for t in a["topk"]],
        "topk_probability": [t["probability"] for a in answers for t in a["topk"]],
    }
    k = len(answers[0]["topk"]) if answers else 0
    outputs = [{"name": name, "datatype": OUTPUTS[name],
                "shape": [len(answers), k] if name.startswith("topk_") else [len(answers)],
                "data": columns[name]} for name in request.outputs]
    answer = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if answers and answers[0].get("engine"):
        # The protocol's response parameters: which forward pass answered (handler/engine.py), as the plain answer says.
        answer["parameters"] = {"engine": answers[0]["engine"]}
    if request.request_id is not None:
        answer = {"id": request.request_id, **answer}
    return answer
