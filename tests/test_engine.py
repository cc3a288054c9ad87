"""Engine: resumable training, losses, inference modes, checkpoints, params, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import LEARNED_MIOU, make_project
from PIL import Image
from typer.testing import CliRunner

from pipeline.data.labels import get_spec
from pipeline.engine import checkpoint
from pipeline.engine.inference import predict_scores
from pipeline.engine.losses import SegLoss, inverse_log_weights, poly_lr
from pipeline.engine.train import lr_at
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import build_model
from pipeline.params import TrainParams
from stages import steps
from stages.cli import app

runner = CliRunner()


def test_kill_and_resume_gives_the_same_weights(tmp_path, monkeypatch):
    proj = make_project(tmp_path / "p")
    monkeypatch.chdir(proj)
    p = steps.load("params.yaml", ["train.iterations=6", "train.val_interval=3"])
    whole = steps.train(p)
    a = checkpoint.load(proj / "outputs/train/last.pt")
    shutil.rmtree(proj / "outputs")
    steps.train(p, stop_after=3)  # "killed" right after the step-3 checkpoint
    assert checkpoint.load(proj / "outputs/train/last.pt")["step"] == 3
    resumed = steps.train(p, resume=steps.Resume.CONTINUE)
    b = checkpoint.load(proj / "outputs/train/last.pt")
    assert b["step"] == 6 and resumed["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["best_miou"] == whole["best_miou"]
    # `seg train --resume` refuses other params, and a finished run, saying why (the starts
    # --auto-resume chooses instead: tests/test_faults.py)
    p2 = steps.load("params.yaml", ["train.iterations=6", "train.val_interval=3", "train.lr=0.02"])
    with pytest.raises(CheckpointError, match="train.lr"):
        steps.plan_resume(proj / "outputs/train/last.pt", p2, steps.Resume.CONTINUE)
    result = runner.invoke(
        app, ["train", "--resume", "-S", "train.iterations=6", "-S", "train.val_interval=3"]
    )
    assert result.exit_code == 1 and "finished at step 6" in result.output


def test_all_ignore_crop_gives_zero_loss_not_nan():
    logits = torch.randn(2, 19, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), 255)
    for loss_fn in (
        SegLoss(19),
        SegLoss(19, {"ce": 1.0, "dice": 0.5}, label_smoothing=0.1),
        SegLoss(19, ohem=True, ohem_min_kept=10),
        SegLoss(19, class_weights=inverse_log_weights(np.arange(19) + 1)),
    ):
        loss = loss_fn(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and float(loss.detach()) == 0.0
        assert torch.isfinite(logits.grad).all()


def test_losses_match_torch_and_ohem_keeps_hard_pixels():
    logits = torch.randn(2, 5, 6, 6)
    target = torch.randint(0, 5, (2, 6, 6))
    target[0, 0] = 255
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(SegLoss(5)(logits, target), ref)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    ref_w = torch.nn.functional.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert torch.allclose(SegLoss(5, class_weights=w)(logits, target), ref_w)
    ohem = SegLoss(5, ohem=True, ohem_thresh=0.0, ohem_min_kept=5)
    assert ohem(logits, target) > SegLoss(5)(logits, target)  # only the hardest pixels count
    perfect = torch.nn.functional.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 50
    assert float(SegLoss(5, {"dice": 1.0})(perfect, target)) < 1e-3


def test_poly_schedule_and_warmup():
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert poly_lr(100, 100, 0.01, min_lr=1e-4) == pytest.approx(1e-4)
    p = TrainParams(iterations=100, lr=0.01, warmup_iters=10)
    assert lr_at(p, 0) == pytest.approx(0.001) and lr_at(p, 9) == pytest.approx(0.01)
    assert lr_at(p, 50) < 0.01


def test_inference_modes_keep_input_size():
    model = build_model("deeplabv3plus", "mobilenet_v3_large", num_classes=4).eval()
    x = torch.randn(2, 3, 67, 131)
    whole = predict_scores(model, x, 4)  # one view: the logits
    assert whole.shape == (2, 4, 67, 131)
    assert torch.allclose(whole, model(x)["out"], atol=1e-5)
    # a window covering the image is whole-image inference
    slide_all = predict_scores(model, x, 4, mode="slide", crop=(80, 160), stride=(60, 120))
    assert torch.allclose(slide_all, whole, atol=1e-5)
    slide = predict_scores(model, x, 4, mode="slide", crop=(48, 64), stride=(32, 48))
    assert slide.shape == whole.shape and not torch.allclose(slide, whole)
    # the windows of both images in one forward or one at a time: the same logits
    one_by_one = predict_scores(
        model, x, 4, mode="slide", crop=(48, 64), stride=(32, 48), window_batch=1
    )
    assert torch.allclose(slide, one_by_one, atol=1e-5)
    # several views: softmax probabilities summed over 2 scales x 2 flips
    tta = predict_scores(model, x, 4, scales=(0.75, 1.25), flip=True)
    assert tta.shape == whole.shape
    assert torch.allclose(tta.sum(1), torch.full((2, 67, 131), 4.0), atol=1e-4)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt"):
        checkpoint.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        checkpoint.load(bad)
    checkpoint.save_atomic({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_params_reject_unknown_keys_and_impossible_values(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="train: unknown key.*lrr"):
        steps.load(f)
    f.write_text("train:\n  lr: -0.1\n")
    with pytest.raises(ConfigError, match="train.lr: must be > 0"):
        steps.load(f)
    f.write_text("train:\n  model:\n    output_stride: 12\n")
    with pytest.raises(ConfigError, match="output_stride: 12 is not one of 8, 16, 32"):
        steps.load(f)
    result = runner.invoke(app, ["train", "--params", str(f)])
    assert result.exit_code == 1 and "output_stride" in result.output
    for bad, message in [
        ("train:\n  keep_best: 0\n", "train.keep_best: must be > 0"),
        ("train:\n  seed: -1\n", "train.seed: must be >= 0"),
        ("evaluate:\n  stride: [1200, 1200]\n", "stride .* must not exceed"),
        ("evaluate:\n  batch_size: 0\n", "evaluate.batch_size: must be >= 1"),
    ]:
        f.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            steps.load(f)


def test_overrides_read_values_as_yaml_1_2(tmp_path):
    """`-S` values parse as DVC parses them (YAML 1.2): off stays a string, 1e-06 (what a
    sweep writes for 0.000001) and 1.0e-3 are floats."""
    from pipeline.params import yaml_load

    assert [yaml_load(t) for t in ("off", "1e-06", "1.0e-3", "12", "[1.0, 2]")] == [
        "off", 1e-06, 1.0e-3, 12, [1.0, 2]
    ]  # fmt: skip
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  lr: 0.01\n  min_lr: 0.0\n")
    assert steps.load(f, ["train.lr=1e-06"]).train.lr == 1e-06
    # a value cut at a space by the shell: one line naming the override, not yaml's traceback
    with pytest.raises(ConfigError, match=r"'train.scale_range=\[0.5,': the value is not YAML"):
        steps.load(f, ["train.scale_range=[0.5,"])


def test_cli_eval_predict_average_runs(learned_project, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    shutil.copytree(learned_project, proj)
    monkeypatch.chdir(proj)
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((proj / "outputs/eval/metrics.json").read_text())
    assert metrics["miou"] > LEARNED_MIOU and set(metrics["per_class_iou"]) == set(
        get_spec("cityscapes").class_names
    )
    prov = metrics["provenance"]
    assert len(prov["checkpoint"]["sha256"]) == 64 and len(prov["data"]["sha256"]) == 64
    assert (proj / "outputs/eval/confusion.png").stat().st_size > 0
    # evaluation at another output stride and with TTA runs on the same weights
    result = runner.invoke(
        app, ["eval", "-S", "evaluate.output_stride=8", "-S", "evaluate.flip=true", "--out", "e8"]
    )
    assert result.exit_code == 0, result.output

    images = sorted((proj / "data/synthetic/leftImg8bit/val").rglob("*.png"))
    wrong = runner.invoke(
        app,
        ["predict", str(images[0]), "--checkpoint", "outputs/train/best.pt", "--dataset", "voc"],
    )
    assert wrong.exit_code == 1 and "predicts 19 classes, dataset voc has 21" in wrong.output
    gaps = runner.invoke(
        app,
        [
            "predict",
            str(images[0]),
            "--checkpoint",
            "outputs/train/best.pt",
            "--mode",
            "slide",
            "--crop",
            "32",
            "32",
            "--stride",
            "48",
            "48",
        ],
    )
    assert gaps.exit_code == 1 and "must not exceed" in gaps.output
    result = runner.invoke(
        app, ["predict", str(images[0].parent), "--checkpoint", "outputs/train/best.pt", "--out", "pred", "--mode", "slide", "--crop", "32", "64", "--stride", "32", "48"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stem = images[0].name.replace("_leftImg8bit.png", "")
    for kind in ("trainIds", "labelIds", "color", "overlay"):
        assert (proj / "pred" / f"{stem}_{kind}.png").is_file()
    label_ids = np.asarray(Image.open(proj / "pred" / f"{stem}_labelIds.png"))
    assert set(np.unique(label_ids)) <= set(get_spec("cityscapes").train_to_label)

    # labelIds alone (the test-server format) score through `seg eval --predictions`
    result = runner.invoke(
        app, ["predict", "data/synthetic/leftImg8bit/val", "--checkpoint", "outputs/train/best.pt", "--out", "server", "--output", "labelids"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (proj / "server").iterdir())
    assert written and all(n.endswith("_labelIds.png") for n in written), written
    result = runner.invoke(
        app, ["eval", "--predictions", "server", "--gt", "data/synthetic", "--out", "scored"]
    )
    assert result.exit_code == 0, result.output

    result = runner.invoke(
        app,
        [
            "average",
            *map(str, sorted((proj / "outputs/train").glob("best-*.pt"))),
            "--out",
            "avg.pt",
        ],
    )
    assert result.exit_code == 0, result.output
    assert checkpoint.load(proj / "avg.pt")["averaged_from"]

    result = runner.invoke(app, ["runs"])
    assert result.exit_code == 0 and "2 evaluation(s)" in result.output
    result = runner.invoke(app, ["runs", "--compare", "0", "1"])
    assert result.exit_code == 0 and "road" in result.output


def test_output_stride_switch_freezes_bn_and_travels_with_the_checkpoint(tmp_path, monkeypatch):
    """DeepLabV3 protocol: train at OS16, then OS8 with BN frozen; eval runs at OS8."""
    from pipeline.engine.checkpoint import build_from_checkpoint

    proj = make_project(tmp_path / "p")
    monkeypatch.chdir(proj)
    p = steps.load("params.yaml", ["train.os8_from=2", "train.checkpoint_interval=1"])
    steps.train(p, stop_after=2)
    before = checkpoint.load(proj / "outputs/train/last.pt")
    steps.train(p, resume=steps.Resume.CONTINUE)
    after = checkpoint.load(proj / "outputs/train/last.pt")
    assert before["output_stride"] == 16 and after["output_stride"] == 8
    bn = [k for k in after["model"] if k.endswith("running_mean")]
    assert bn and all(torch.equal(before["model"][k], after["model"][k]) for k in bn)
    conv = next(k for k in after["model"] if k.endswith("weight") and after["model"][k].dim() == 4)
    assert not torch.equal(before["model"][conv], after["model"][conv])  # the rest still trains
    model, _ = build_from_checkpoint(proj / "outputs/train/last.pt")
    assert model.output_stride == 8


def test_averaged_checkpoint_is_the_mean_of_its_inputs(tmp_path):
    """`seg average`: every float tensor (BatchNorm's running statistics too) is the mean of
    the inputs'; integer buffers (num_batches_tracked) come from the first."""
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("deeplabv3plus", "mobilenet_v3_large", num_classes=4)
        model.train()(torch.randn(2, 3, 32, 32))  # moves the BN running statistics
        states.append(model.state_dict())
        checkpoint.save_atomic(
            {"model": model.state_dict(), "model_config": {"num_classes": 4}, "step": seed},
            tmp_path / f"{seed}.pt",
        )
    checkpoint.average_checkpoints([tmp_path / f"{s}.pt" for s in range(3)], tmp_path / "avg.pt")
    avg = checkpoint.load(tmp_path / "avg.pt")["model"]
    bn = [k for k in avg if k.endswith("running_var")]
    assert bn and not torch.equal(states[0][bn[0]], states[1][bn[0]])
    for k, v in avg.items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(s[k] for s in states) / 3, atol=1e-6), k
        else:
            assert torch.equal(v, states[0][k]), k


def test_cosine_schedule_and_adam_optimizers():
    p = TrainParams(iterations=100, lr=0.01, min_lr=0.001, schedule="cosine", warmup_iters=0)
    assert lr_at(p, 0) == pytest.approx(0.01)
    assert lr_at(p, 50) == pytest.approx(0.001 + 0.5 * 0.009)  # halfway: the midpoint
    assert lr_at(p, 100) == pytest.approx(0.001)
    assert all(lr_at(p, s) > lr_at(p, s + 1) for s in range(99))
    from pipeline.engine.train import build_optimizer

    w = torch.nn.Parameter(torch.ones(3))
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(
            TrainParams(optimizer=name, lr=0.1, weight_decay=0.01), [w], torch.device("cpu")
        )
        assert type(opt) is cls and opt.defaults["weight_decay"] == 0.01
    # AdamW decays the weights apart from the gradient: with a zero gradient it still shrinks
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(
        TrainParams(optimizer="adamw", lr=0.1, weight_decay=0.5), [w], torch.device("cpu")
    )
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_label_smoothed_cross_entropy_value():
    """With smoothing e over K classes the target is (1 - e) on the true class plus e/K on
    every class: the loss is (1 - e) * CE + e * mean over classes of -log p."""
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]])  # (1, 3, 1, 1)
    target = torch.tensor([[[0]]])
    logp = torch.log_softmax(logits[0, :, 0, 0], 0)
    expected = (1 - 0.1) * -logp[0] + 0.1 * -logp.mean()
    assert float(SegLoss(3, label_smoothing=0.1)(logits, target)) == pytest.approx(float(expected))
    # ignored pixels stay out of the mean with smoothing too
    two = torch.cat([logits, logits], 3)
    assert float(SegLoss(3, label_smoothing=0.1)(two, torch.tensor([[[0, 255]]]))) == (
        pytest.approx(float(expected))
    )
