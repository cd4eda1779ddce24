"""ONNX deployment: a detector's export program as an ONNX file, and ONNX Runtime behind our models' interface.

    python -m msad.export --checkpoint runs/student/model_final.pth --output runs/student/student.onnx
    python evaluate.py --checkpoint runs/student/student.onnx     # ONNX Runtime, CPU provider

The ONNX file is the `.pt2` program of msad/export.py converted by `torch.onnx.export(..., dynamo=True)`: the
same inputs (`image`, uint8 [3, H, W], H and W dynamic; `size`, int64 [2]), contents (normalisation, the model
at its own resolution, decoding, class-wise NMS as ONNX NonMaxSuppression) and outputs (`boxes`, `scores`,
`labels`, and `masks` for a model with a mask branch). Two operators need a translation: torchvision's NMS
becomes NonMaxSuppression (onnxscript's own translation; class_nms runs one per class, so it is exact class-wise NMS as in the released code), and the
stable descending sort of class_nms becomes TopK, which breaks ties by the lower index as a stable sort does
(ONNX TopK's definition), so the detections come in the same order. The metadata (metadata_props) holds
`category_ids` and `category_names` (JSON lists, indexed by the `labels` output) and msad's own `msad.json`.

It needs onnx, onnxscript and onnxruntime (requirements-deploy.txt), imported only here.
"""
import contextlib
import json
import logging

import torch

from .checkpoint import write_atomic
from .export import METADATA, ProgramDetector, read_metadata

INPUTS, OUTPUTS = ("image", "size"), ("boxes", "scores", "labels")
DEPENDENCIES = ("onnx", "onnxscript", "onnxruntime")
ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}  # ONNX Runtime's graph optimisation levels


def require(what: str) -> None:
    """One line naming the install command when a deployment dependency is missing."""
    for name in DEPENDENCIES:
        try:
            __import__(name)
        except ImportError:
            raise ValueError(f"{what} needs {', '.join(DEPENDENCIES)} ({name} is not installed): "
                             f"pip install -r requirements-deploy.txt") from None


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    """aten::sort.stable as ONNX TopK of every element: equal values keep their order (lower index first)."""
    from onnxscript import opset18 as op
    n = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, n, axis=dim, largest=descending, sorted=True)


@contextlib.contextmanager
def _quiet(*names):
    """Silence the converters' informational logs (an empty attribute list is INTS, as intended)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(program: torch.export.ExportedProgram, optimize: bool = True, masks: bool = False):
    """The ONNX program (torch.onnx.ONNXProgram) of an msad.export program (of a mask model: `masks`); converts
    `program` once."""
    require("ONNX export")
    names = OUTPUTS + (("masks",) if masks else ())
    with _quiet("onnx_ir", "onnxscript", "torch.onnx"), torch.no_grad():
        return torch.onnx.export(program, dynamo=True, custom_translation_table={
            torch.ops.aten.sort.stable: _sort_stable}, input_names=list(INPUTS), output_names=list(names),
            optimize=optimize, verbose=False)


def save_onnx(onnx_program, path, meta: dict, categories) -> None:
    """Write the ONNX file atomically, with msad's metadata and the category ids and names in metadata_props."""
    ids, names = categories
    onnx_program.model.metadata_props.update({METADATA: json.dumps(meta), "category_ids": json.dumps(ids),
                                             "category_names": json.dumps(names)})
    data = onnx_program.model_proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))


def session(path: str, threads: int | None = None, level: str = "all"):
    """An ONNX Runtime CPU session of `path`; `threads` intra-op threads (default: torch's), graph
    optimisation `level` (disable | basic | extended | all)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class OnnxDetector(ProgramDetector):
    """An ONNX file of python -m msad.export run by ONNX Runtime's CPU provider, behind the interface of our
    models (ImageBatch -> detections in original pixels); on any --device, it runs on the CPU."""

    def __init__(self, path: str):
        require(f"{path} (an ONNX file)")
        try:
            ort_session = session(path)
        except Exception as e:  # missing, torn, not ONNX
            raise ValueError(f"{path} is not a loadable ONNX model ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0]})") from None
        props = ort_session.get_modelmeta().custom_metadata_map
        super().__init__(path, read_metadata(props.get(METADATA), path, "an ONNX file"))
        self.session = ort_session

    def run(self, image, size):
        names = OUTPUTS + (("masks",) if self.masks else ())
        outputs = self.session.run(list(names), {"image": image.cpu().numpy(), "size": size.cpu().numpy()})
        return tuple(torch.from_numpy(x).to(image.device) for x in outputs)
