"""Export: `seg export` to ONNX / TorchScript / torch.export, and `seg predict --model`.

Every exported format is run on the real Cityscapes frame at 1024x2048 and at an odd size with
another batch, against the eager PyTorch model of the checkpoint it came from.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.transforms import normalize, resize_image
from pipeline.engine import export
from pipeline.engine.checkpoint import build_from_checkpoint, sha256_file
from pipeline.engine.export import FORMATS, SUFFIXES, load_exported, read_image
from pipeline.errors import CheckpointError
from stages.cli import app

runner = CliRunner()
# torch.jit is deprecated (FutureWarning) but TorchScript is one of the formats under test
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
FRAME = (
    Path(__file__).resolve().parents[2]
    / "shared/data/cityscapes_sample/leftImg8bit/val/frankfurt"
    / "frankfurt_000000_000294_leftImg8bit.png"
)
needs_frame = pytest.mark.skipif(not FRAME.is_file(), reason=f"{FRAME} (shared data) is absent")
FULL = (1024, 2048)


def _no_temporaries(folder: Path) -> bool:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


@pytest.fixture(scope="module")
def checkpoint(trained_project) -> Path:
    return trained_project / "outputs/train/best.pt"


@pytest.fixture(scope="module")
def exported(checkpoint, scratch) -> dict[str, Path]:
    """The checkpoint exported by the CLI in every format (checked on the real frame)."""
    folder = scratch("exported")
    files = {}
    for fmt in FORMATS:
        out = folder / f"model{SUFFIXES[fmt]}"
        args = ["export", str(checkpoint), "--format", fmt, "--out", str(out)]
        if FRAME.is_file():
            args += ["--check-image", str(FRAME)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "checked against PyTorch" in result.output
        files[fmt] = out
    assert _no_temporaries(folder)
    return files


@pytest.fixture(scope="module")
def frame_full(scratch) -> Path:
    """The real Cityscapes frame (128x256 in shared/) bilinearly upscaled to 1024x2048."""
    if not FRAME.is_file():
        pytest.skip(f"{FRAME} (shared data) is absent")
    folder = scratch("frame")
    image = resize_image(read_image(FRAME)[0], FULL).permute(1, 2, 0).numpy()
    path = folder / FRAME.name
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def eager_logits(checkpoint, frame_full) -> torch.Tensor:
    model, _ = build_from_checkpoint(checkpoint)
    with torch.inference_mode():
        return model(normalize(read_image(frame_full)))["out"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_logits_match_pytorch_at_full_and_odd_sizes(
    fmt, exported, checkpoint, eager_logits, frame_full
):
    model, ckpt = build_from_checkpoint(checkpoint)
    runtime = load_exported(exported[fmt])
    assert runtime.format == fmt
    # the real frame at 1024x2048: the sizes DeepLab upsamples to come from the input
    with torch.inference_mode():
        out = runtime(normalize(read_image(frame_full)))["out"]
    assert out.shape == eager_logits.shape == (1, 19, *FULL)
    diff = float((out - eager_logits).abs().max())
    scale = float(eager_logits.abs().max())
    assert diff <= 1e-3 * scale + 1e-5, (diff, scale)
    agreement = float((out.argmax(1) == eager_logits.argmax(1)).float().mean())
    assert agreement >= 0.999, agreement
    # another batch size at an odd size: nothing of the export-time example is baked in
    g = torch.Generator().manual_seed(3)
    x = normalize(torch.randint(0, 256, (3, 3, 67, 131), generator=g, dtype=torch.uint8))
    with torch.inference_mode():
        ref, out = model(x)["out"], runtime(x)["out"]
    assert out.shape == (3, 19, 67, 131)
    assert float((out - ref).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-5
    # per-image results do not depend on the batch they ran in
    with torch.inference_mode():
        alone = runtime(x[1:2])["out"]
    assert torch.allclose(alone, out[1:2], atol=1e-5 + 1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_travels_with_the_file(fmt, exported, checkpoint):
    _, ckpt = build_from_checkpoint(checkpoint)
    meta = load_exported(exported[fmt]).metadata
    assert meta["num_classes"] == 19 == ckpt["model_config"]["num_classes"]
    assert meta["dataset"] == "cityscapes"
    assert meta["output_stride"] == ckpt["output_stride"]
    assert meta["model_config"] == json.loads(json.dumps(ckpt["model_config"]))
    assert meta["checkpoint"]["sha256"] == sha256_file(checkpoint)
    assert meta["input"]["mean"] == [123.675, 116.28, 103.53]
    # readable with the format's own tools, without this project's loader
    if fmt == "onnx":
        import onnx

        proto = onnx.load(str(exported[fmt]))
        props = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(props["deeplab_pipeline"]) == meta
        assert proto.opset_import[0].version >= 17
        # batch, height and width are named (dynamic) dimensions, channels are 3
        (image,) = proto.graph.input
        dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
        assert image.name == "image" and dims[1] == 3, dims
        assert all(isinstance(dims[i], str) and dims[i] for i in (0, 2, 3)), dims
    else:
        with zipfile.ZipFile(exported[fmt]) as z:
            (name,) = [n for n in z.namelist() if n.endswith("/deeplab_pipeline.json")]
            assert json.loads(z.read(name)) == meta


@needs_frame
def test_predict_with_an_exported_model_writes_the_checkpoints_outputs(
    exported, checkpoint, frame_full, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        # fp32 like the exported model: `auto` would run bf16 on a CPU that has it natively
        app, ["predict", str(frame_full), "--checkpoint", str(checkpoint), "--out", "ckpt",
              "--amp", "off"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stem = frame_full.name.replace("_leftImg8bit.png", "")
    ref = np.asarray(Image.open(tmp_path / "ckpt" / f"{stem}_trainIds.png"))
    assert ref.shape == FULL
    for fmt, path in exported.items():
        result = runner.invoke(
            app, ["predict", str(frame_full), "--model", str(path), "--out", fmt]
        )
        assert result.exit_code == 0, result.output
        for kind in ("trainIds", "labelIds", "color", "overlay"):
            assert (tmp_path / fmt / f"{stem}_{kind}.png").is_file(), (fmt, kind)
        train_ids = np.asarray(Image.open(tmp_path / fmt / f"{stem}_trainIds.png"))
        agreement = float((train_ids == ref).mean())
        print(f"{fmt}: trainIds agree with the checkpoint's on {100 * agreement:.4f} %")
        assert agreement >= 0.999, (fmt, agreement)
    # sliding windows (clamped at the border) and flips go through the exported model too
    tta = ["--mode", "slide", "--crop", "64", "128", "--stride", "48", "80", "--flip"]
    for name, source in (("tta-ckpt", ["--checkpoint", str(checkpoint), "--amp", "off"]),
                         ("tta-onnx", ["--model", str(exported["onnx"])])):  # fmt: skip
        result = runner.invoke(app, ["predict", str(FRAME), *source, "--out", name, *tta])
        assert result.exit_code == 0, result.output
    stem_small = FRAME.name.replace("_leftImg8bit.png", "")
    a, b = (
        np.asarray(Image.open(tmp_path / name / f"{stem_small}_trainIds.png"))
        for name in ("tta-ckpt", "tta-onnx")
    )
    assert a.shape == (128, 256) and (a == b).mean() >= 0.999
    # a VOC label table with a Cityscapes model: refused as with --checkpoint
    result = runner.invoke(
        app,
        ["predict", str(frame_full), "--model", str(exported["onnx"]), "--dataset", "voc"],
    )
    assert result.exit_code == 1
    assert "model.onnx: the model predicts 19 classes, dataset voc has 21" in result.output


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the bug this test plants
def test_a_shape_baked_in_at_export_fails_the_check_and_writes_nothing(
    checkpoint, tmp_path, monkeypatch
):
    """The failure the check exists for: a trace that turned the input size into constants."""

    class Baked(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h, w = int(x.shape[2]), int(x.shape[3])  # Python ints: constants in a trace
            return self.net(x)[:, :, :h, :w]

    def baked_writer(net, example, path, meta):
        with torch.no_grad():
            traced = torch.jit.trace(Baked(net), example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={export.EXTRA_FILE: json.dumps(meta)})

    monkeypatch.setitem(export._WRITERS, "torchscript", baked_writer)
    out = tmp_path / "baked.torchscript.pt"
    with pytest.raises(CheckpointError, match="baked.torchscript.pt: .* does not match PyTorch"):
        export.export_checkpoint(checkpoint, "torchscript", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_inputs_fail_in_one_line_naming_the_file(checkpoint, exported, tmp_path):
    def fails(args, *names):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        for name in names:
            assert name in result.output, (name, result.output)

    fails(["export", str(tmp_path / "missing.pt")], "missing.pt: checkpoint not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    fails(["export", str(corrupt)], "corrupt.pt: not a readable checkpoint")
    fails(["export", str(checkpoint), "--format", "tflite"], "best.pt", "unknown export format")
    assert not (checkpoint.parent / "best.tflite").exists()

    image = str(FRAME if FRAME.is_file() else checkpoint)
    # a checkpoint where an exported model belongs
    fails(["predict", image, "--model", str(checkpoint)], "best.pt: a PyTorch checkpoint")
    fails(["predict", image, "--model", str(tmp_path / "nope.onnx")], "nope.onnx: exported model not found")  # fmt: skip
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage" * 10)
    fails(["predict", image, "--model", str(garbage)], "garbage.onnx: not an ONNX file")
    # real files of each kind that `seg export` did not write (no metadata)
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])],
    )  # fmt: skip
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    fails(["predict", image, "--model", str(foreign)], "foreign.onnx: no deeplab_pipeline metadata")
    foreign_ts = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.trace(torch.nn.ReLU(), torch.zeros(1)), str(foreign_ts))
    fails(["predict", image, "--model", str(foreign_ts)], "foreign.pt: no deeplab_pipeline")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(exported["exported-program"].read_bytes()[:4096])
    fails(["predict", image, "--model", str(truncated)], "truncated.pt2")
    # --model and --checkpoint together: a usage error
    result = runner.invoke(
        app, ["predict", image, "--model", str(exported["onnx"]), "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 2
