"""TorchServe handler for the CIFAR-100 classifier.

BaseHandler does the device choice (``cuda:<gpu_id>`` when TorchServe gives the worker a GPU, else
CPU) and reads the manifest and model-config.yaml; this class overrides only what differs:
  * ``_load_pickled_model``: BaseHandler builds ``model_class()`` with no arguments and wants
    exactly one nn.Module class in ``--model-file``; our network (model/network.py, three classes)
    needs its width, which is read off the state dict, and comes from the ``model`` package
    shipped in the archive (``--extra-files``).
  * ``preprocess``: decode any image Pillow reads (handler/preprocessing.py), sent as a raw body,
    a multipart field, base64 in JSON, or in a KServe v1 / Open Inference Protocol v2 body
    (handler/protocols.py; such a request may carry several images); a bad image fails only its
    own request, with a 4xx.
  * ``inference``: the engine chosen at start (handler/engine.py: compiled, bf16 or OpenVINO where
    this machine allows and the accuracy guard passes, else eager fp32), with flip test-time
    augmentation when ``handler.flip_tta`` is on; skip the forward pass when every image of a batch
    was refused; count the images (and openvino-int8's rechecks) as Prometheus counters.
  * ``postprocess``: the per-image JSON contract the /classify/ adapter relies on (top-k), with
    calibrated probabilities and an ``unsure`` flag (handler/calibration.py), grouped per request
    and answered in the request's protocol.
  * ``explain_handle``: TorchServe's /explanations: the same answer plus a Grad-CAM heatmap of
    the top-1 class (handler/explain.py).

TorchServe loads this file as the handler module and wants exactly one class defined in it; the
helpers therefore live in the ``handler`` package, also shipped in the archive.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from itertools import islice

import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from handler import engine as engines
from handler.answers import NOT_FINITE, image_answers, served_topk
from handler.calibration import load_calibration
from handler.explain import HEATMAP_MAX_SIDE
from handler.preprocessing import INPUT_SIZE, ImageRequestError, decoded_tensors, image_bytes, normalize, opened_images
from handler.engine import serving_model
from handler.protocols import (DEFAULT_MAX_IMAGES_PER_REQUEST, TORCHSERVE_DECODE_SETTING, ProtocolError,
                               decoded_fields, encode_answer, logged_request_id, parse_request, with_heatmaps)
from serving.settings import EXPLAINER_READY_LOG_LINE
from model import check_class_count, load_class_names, network_from_state_dict

logger = logging.getLogger(__name__)
# TorchServe's worker logs this at INFO on the root logger for every batch it receives
# (ts/protocol/otf_message_handler.py): one model_log.log line per batch for the frontend to parse and
# write, with nothing in it an operator reads (the access log and the metrics say when requests came).
PER_BATCH_LOG_LINE = "Backend received inference at: %d"


def not_per_batch_line(record: logging.LogRecord) -> bool:
    """A logging filter (a function: TorchServe refuses a handler module with a second class)."""
    return record.msg != PER_BATCH_LOG_LINE


class CIFAR100Handler(BaseHandler):
    def initialize(self, context):
        # This worker hands preprocess its requests' bytes; JSON is parsed there, after its values are counted.
        os.environ[TORCHSERVE_DECODE_SETTING] = "false"
        model_cfg = getattr(context, "model_yaml_config", None) or {}  # model-config.yaml
        handler_cfg = model_cfg.get("handler") or {}
        if not (torch.cuda.is_available() and context.system_properties.get("gpu_id") is not None):
            torch.set_num_threads(engines.worker_threads(model_cfg))  # CPU worker: its share of the cores
        super().initialize(context)  # device, manifest, model (via _load_pickled_model), eval mode
        logging.getLogger().addFilter(not_per_batch_line)  # once: a filter already there is not added again
        model_dir = context.system_properties.get("model_dir")
        self.labels = load_class_names(os.path.join(model_dir, "index_to_name.json"))
        check_class_count(self.model.num_classes, self.labels)  # else a top-k index past the names fails each batch
        self.topk = served_topk(handler_cfg, len(self.labels))
        self.model_version = str(self.manifest["model"].get("modelVersion", "unknown"))
        self.max_images = int(handler_cfg.get("max_images_per_request", DEFAULT_MAX_IMAGES_PER_REQUEST))
        self._errors: dict[int, ImageRequestError] = {}  # per batch: position -> why refused
        self._requests: list = []  # per batch position: (v1/v2 request or None for plain, image count)
        self._sizes: list[tuple[int, int]] = []  # per batch: (width, height) of each good image
        self._said_not_finite = False  # NOT_FINITE logged already (once per worker)
        # Flip test-time augmentation: each image and its mirror in one forward pass, logits averaged
        # (model/tta.py): about a point of top-1 for a costlier forward pass (figures: model/README.md).
        self.flip_tta = engines.flip_tta(model_cfg)
        self.calibration = load_calibration(model_dir, self.flip_tta)
        self.engine = self._start_engine(handler_cfg.get("engine", engines.AUTO), engines.images_per_forward(model_cfg),
                                         model_dir)
        if self.device.type == "cpu":  # a lone image (and its mirror with flip TTA) on an idle neighbour's cores too
            self.engine.lend_threads(engines.lone_image_threads(model_cfg), 2 if self.flip_tta else 1)
        self._explanation_model = None  # built on the first explanation (handler/explain.py)
        # Longer side of a Grad-CAM heatmap PNG (model-config.yaml handler.heatmap_max_side, optional).
        self.heatmap_max_side = int(handler_cfg.get("heatmap_max_side", HEATMAP_MAX_SIDE))
        logger.info("CIFAR-100 model %s on %s, %d threads, top-%d, engine %s %s, flip TTA %s", self.model_version,
                    self.device, torch.get_num_threads(), self.topk, self.engine.name, self.engine.info,
                    "on" if self.flip_tta else "off")

    def _start_engine(self, setting: str, max_batch: int, model_dir: str) -> engines.Engine:
        """Build (or load from the cache) the forward pass before READY; its calibration if it moved."""
        engine, self.calibration = engines.start(setting, self.model, self._weights_sha256, max_batch, self.device,
                                                 model_dir, self.calibration, self.flip_tta)
        return engine

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        with open(model_pt_path, "rb") as f:
            self._weights_sha256 = hashlib.sha256(f.read()).hexdigest()  # names the engine cache entry
        state_dict = torch.load(model_pt_path, map_location="cpu", weights_only=True)
        self._state_dict = state_dict  # for the explanation model, built on first use
        return serving_model(state_dict)

    def preprocess(self, data):
        """One dict per request -> normalized batch of the good images; bad ones are remembered.

        A v1/v2 request may carry several images; one bad image refuses that whole request.
        """
        self._errors, self._requests, self._sizes = {}, [], []
        tensors = []
        for idx, row in enumerate(data):
            request, images = None, []
            try:
                headers = self.context.get_all_request_header(idx)
                row = decoded_fields(row, headers, self.max_images)
                request = parse_request(row, self.max_images, headers)
                opened = opened_images(request, request.images if request else [image_bytes(row)])
                images, sizes = decoded_tensors(request, opened)
                tensors.extend(images)
                self._sizes.extend(sizes)
            except (ImageRequestError, ProtocolError) as err:
                # A copy without the traceback: the original's frames hold the image's decoded pixels
                # (hundreds of MB for a large one) until the next batch.
                self._errors[idx], images = ImageRequestError(err.status, err.message), []
            except Exception as err:  # noqa: BLE001 - never let one request fail the whole batch
                logger.exception("%s (%d of the batch) failed in preprocessing", self._request_id(idx), idx)
                self._errors[idx], images = ImageRequestError(400, f"could not read the image: {err}"), []
            self._requests.append((request, len(images)))
        if not tensors:
            return torch.empty(0, 3, INPUT_SIZE, INPUT_SIZE, device=self.device)
        return normalize(torch.stack(tensors).to(self.device, non_blocking=True))

    def inference(self, data, *args, **kwargs):
        if data.shape[0] == 0:
            return data.new_empty(0, len(self.labels))
        logits, images, rechecked = self.engine.answer(data, self.flip_tta)
        self._count_forward(images, rechecked)
        return logits

    def _count_forward(self, images: int, rechecked: int) -> None:
        """Prometheus counters through TorchServe's metrics API (config.properties: model_metrics_auto_detect):
        images through the engine, and for openvino-int8 those fp32 answered again."""
        metrics = self.context.metrics
        if metrics is None:  # a Context made outside TorchServe
            return
        # ModelVersion: TorchServe's own series cannot tell the versions of a rollout apart (README, Metrics).
        dimensions = [Dimension("Engine", self.engine.name), Dimension("ModelVersion", self.model_version)]
        metrics.add_counter(engines.IMAGES_METRIC, images, dimensions=dimensions)
        if self.engine.name == engines.OPENVINO_INT8:
            metrics.add_counter(engines.RECHECKED_METRIC, rechecked, dimensions=dimensions)

    def postprocess(self, data):
        rows = iter(image_answers(data, self.calibration, self.topk, self.labels, self.model_version, self.engine.name))
        batch_size = len(self._requests)
        answers = []
        for idx in range(batch_size):
            # TorchServe sends no Content-Type of its own for handler output.
            self.context.set_response_content_type(idx, "application/json")
            # How many requests shared this forward pass: lets operators (and the tests) see batching.
            self.context.set_response_header(idx, "X-Batch-Size", str(batch_size))
            self.context.set_response_header(idx, "X-Batch-Images", str(len(data)))
            request, count = self._requests[idx]
            images = list(islice(rows, count))
            err = self._errors.get(idx) or (self._not_finite(idx) if None in images else None)
            if err is not None:
                # TorchServe sends `code` as the HTTP status and `phrase` as its reason phrase (one
                # printable ASCII line there), and the returned object as the body.
                phrase = " ".join(err.message.split()).encode("ascii", "replace").decode()[:200]
                self.context.set_response_status(err.status, phrase, idx)
                if err.status < 500:
                    logger.info("%s refused: %d %s", self._request_id(idx), err.status, phrase)
                answers.append({"error": err.message})
                continue
            answers.append(encode_answer(request, images, self.context.model_name, self.model_version))
        return answers

    def _request_id(self, idx: int) -> str:
        """The request's X-Request-ID (the adapter's, which its log line has too), for this worker's log lines."""
        return logged_request_id(self.context.get_all_request_header(idx))

    def _not_finite(self, idx: int) -> ImageRequestError:
        """A 500 for a request whose answer is NaN or infinite; said in the log once per worker (then every
        request would add a line)."""
        if not self._said_not_finite:
            self._said_not_finite = True
            logger.error("%s failed: %s Every such request is answered 500 (this line is not repeated); "
                         "roll back to weights that answer numbers.", self._request_id(idx), NOT_FINITE)
        return ImageRequestError(500, NOT_FINITE)

    def _is_describe(self):
        # BaseHandler answers a whole batch with one describe_handle() when its first request has the
        # header describe: True, and TorchServe then fails every request of the batch (503 "number of batch
        # response mismatched"). The model's description is the management API's: every request is answered.
        return False

    # --- /explanations/<model>: TorchServe marks those requests with the header explain=True ---
    def _wants_explanation(self, idx: int) -> bool:
        return self.context.get_request_header(idx, "explain") == "True"

    def _is_explain(self):
        # A batch may mix /predictions and /explanations requests (one queue per model); BaseHandler
        # looks at the first request only. Explain when any request asks; the others get plain answers.
        return any(self._wants_explanation(idx) for idx in range(len(self.context.request_processor or ())))

    def explain_handle(self, data_preprocess, raw_data):
        """The prediction answers, plus a Grad-CAM ``heatmap`` for each request that asked for one."""
        from handler.explain import explanation_model, heatmaps  # captum: imported on first use

        logits = self.inference(data_preprocess)
        answers = self.postprocess(logits)
        # Rows of the batch tensor per request (a v1/v2 request may carry several images: each gets its heatmap).
        requests, rows, start = [], [], 0
        for idx, (request, count) in enumerate(self._requests):
            if count and self._wants_explanation(idx) and "error" not in answers[idx]:
                requests.append((idx, request, count))
                rows.extend(range(start, start + count))
            start += count
        if rows:
            first, started = self._explanation_model is None, time.perf_counter()
            if first:
                self._explanation_model = explanation_model(network_from_state_dict(self._state_dict)).to(self.device)
            maps = heatmaps(self._explanation_model, data_preprocess[rows], logits[rows].argmax(dim=1),
                            [self._sizes[r] for r in rows], self.heatmap_max_side)
            if first:  # Captum is imported by the first heatmaps() call
                logger.info(EXPLAINER_READY_LOG_LINE, time.perf_counter() - started)
            maps = iter(maps)
            for idx, request, count in requests:
                with_heatmaps(answers[idx], request, list(islice(maps, count)))
        return answers
