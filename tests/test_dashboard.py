"""The TensorBoard dashboards: tiny stage-1 and stage-2 fits, read back from their event files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from slit_lightning.data.datamodule import AudioTextDataModule
from slit_lightning.model.llm import Generation
from slit_lightning.stages import Stage1, Stage2
from slit_lightning.training.dashboard import (
    Dashboard,
    attention_image,
    batch_size,
    clip_markdown,
    take_rows,
)
from tests.conftest import write_tone_clips

QFORMER = {"num_queries": 4, "cross_attention_freq": 2}
CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Eight half-second clips with two captions each."""
    return write_tone_clips(
        tmp_path_factory.mktemp("clips"), 8, 0.5,
        lambda i: {"captions": [f"tone {i}", f"a tone {i}"]}, suffix=".wav", hz=(200.0, 60.0),
    )  # fmt: skip


def _fit(model, clips: Path, log_dir: Path, name: str, **trainer_args) -> Path:
    """Fit ``model`` for two epochs of two steps with TensorBoard and the dashboard; returns the
    run's folder (``log_dir/name/version_0``)."""
    dm = AudioTextDataModule(
        train=str(clips), val=str(clips), batch_size=4, num_workers=0, max_seconds=0.5
    )
    logger = TensorBoardLogger(str(log_dir), name=name, default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[
            LearningRateMonitor(logging_interval="step"),
            Dashboard(num_clips=2, projector_clips=6, throughput_window=2),
        ],
        **trainer_args,
    )
    trainer.fit(model, datamodule=dm)
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def log_root(tmp_path_factory) -> Path:
    """One log folder for both runs, as the demo's runs/demo/logs."""
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def stage1_logs(clips, tiny_encoder, tiny_bert, log_root) -> Path:
    torch.manual_seed(0)
    model = Stage1(str(tiny_encoder), str(tiny_bert), embed_dim=16, warmup_steps=1, **QFORMER)
    return _fit(model, clips, log_root, "stage1")


@pytest.fixture(scope="module")
def stage2_logs(clips, tiny_encoder, tiny_bert, tiny_llm_factory, log_root) -> Path:
    """Stage 2 with validation switched off, as the demo runs it: the clips come at the end."""
    torch.manual_seed(0)
    model = Stage2(
        str(tiny_encoder),
        str(tiny_bert),
        str(tiny_llm_factory("opt")),
        max_target_len=8,
        warmup_steps=1,
        generation=Generation(max_new_tokens=4),
        **QFORMER,
    )
    return _fit(model, clips, log_root, "stage2", limit_val_batches=0)


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0, "audio": 0})
    events.Reload()
    return events


def _hparams(events: EventAccumulator) -> dict:
    """The run's hyper-parameters as its session record holds them (and no experiment record,
    which would hide the other runs' metrics)."""
    content = events.PluginTagToContent("hparams")
    assert set(content) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return start.session_start_info.hparams


def test_stage1_dashboard_has_every_panel(stage1_logs: Path) -> None:
    events = _events(stage1_logs)
    scalars = set(events.Tags()["scalars"])
    expected = {
        "train/loss", "train/loss_atc", "train/loss_atm", "train/loss_atg", "lr-AdamW/pg1",
        "train/grad_norm", "train/samples_per_sec", "memory/rss_gb", "val/t2a_R@1", "val/a2t_R@5",
    }  # fmt: skip
    assert expected <= scalars, expected - scalars
    assert "hp_metric" not in scalars
    rates = [e.value for e in events.Scalars("train/samples_per_sec")]
    assert rates and all(r > 0 for r in rates)
    norms = events.Scalars("train/grad_norm")
    assert all(e.value > 0 for e in norms)
    assert [e.step for e in norms] == [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert 0.01 < events.Scalars("memory/rss_gb")[-1].value < 1000
    # a clip shown at each of the two validations, its audio once
    images = events.Tags()["images"]
    assert {"val/clip_0/cross_attention", "val/clip_1/cross_attention"} <= set(images)
    assert len(events.Images("val/clip_0/cross_attention")) == 2
    assert set(events.Tags()["audio"]) == {"val/clip_0/audio", "val/clip_1/audio"}
    assert len(events.Audio("val/clip_0/audio")) == 1
    text = events.Tensors("val/clip_0/captions/text_summary")[-1].tensor_proto.string_val[0]
    assert b"c0" in text and b"tone 0" in text and b"generated" not in text


def test_stage1_projector_holds_audio_and_text_of_the_clips(stage1_logs: Path) -> None:
    config = (stage1_logs / "projector_config.pbtxt").read_text()
    assert config.count("embeddings {") == 2  # one per validation
    metadata = sorted(stage1_logs.glob("*/val_embeddings/metadata.tsv"))[-1]
    rows = [line.split("\t") for line in metadata.read_text().splitlines()]
    assert rows[0] == ["kind", "clip", "text"]
    kinds = [r[0] for r in rows[1:]]
    assert kinds.count("audio") == 6 and kinds.count("text") == 12  # 6 clips, 2 captions each
    assert ["text", "c3", "a tone 3"] in rows
    vectors = np.loadtxt(metadata.parent / "tensors.tsv", delimiter="\t")
    assert vectors.shape == (18, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_stage1_hparams_are_recorded(stage1_logs: Path) -> None:
    params = _hparams(_events(stage1_logs))
    assert params["stage"].string_value == "Stage1"
    assert params["num_queries"].number_value == 4
    assert params["data/batch_size"].number_value == 4
    assert params["trainable_parameters"].number_value > 0
    assert not any(name.startswith("_") for name in params)


def test_stage2_without_validation_still_shows_generated_captions(stage2_logs: Path) -> None:
    events = _events(stage2_logs)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_lm", "train/grad_norm", "train/samples_per_sec"} <= scalars
    assert "val/clip_1/cross_attention" in events.Tags()["images"]
    assert "val/clip_0/audio" in events.Tags()["audio"]
    text = events.Tensors("val/clip_1/captions/text_summary")[-1].tensor_proto.string_val[0]
    assert b"**generated**" in text and b"tone 1" in text
    assert _hparams(events)["stage"].string_value == "Stage2"
    assert not list(stage2_logs.glob("projector_config.pbtxt"))  # stage 2 has no contrastive space


def test_attention_image_rows_show_each_querys_peak() -> None:
    weights = torch.full((2, 3, 10), 0.05)  # 2 heads, 3 queries, 10 frames
    weights[:, 1, 7] = 0.5
    image = attention_image([weights, weights], cell=4, min_width=40)
    assert image.dtype == np.uint8 and image.shape == (2 * 3 * 4 + 2, 40, 3)
    yellow = np.array([253, 231, 37])
    np.testing.assert_array_equal(image[4, 28], yellow)  # query 1, frame 7 (4 pixels wide)
    np.testing.assert_array_equal(image[0, 0], [68, 1, 84])  # the band's lowest weight
    np.testing.assert_array_equal(image[12], 255)  # the line between the two layers


def test_clip_markdown_and_rows() -> None:
    batch = {
        "clip_id": ["a", "b", "c"],
        "captions": [["x | y"], ["z"], ["w"]],
        "audio": torch.zeros(3, 5),
        "feature_identity": "enc",
    }
    rows = take_rows(batch, 2)
    assert rows["clip_id"] == ["a", "b"] and rows["audio"].shape == (2, 5)
    assert rows["feature_identity"] == "enc"
    assert batch_size(batch) == 3 and batch_size(rows) == 2
    assert batch_size((torch.zeros(5, 2), torch.zeros(5))) == 5
    text = clip_markdown(rows, 0, ["made  up\ncaption"])
    assert "| **generated** | made up caption |" in text and "x \\| y" in text


def test_dashboard_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="throughput_window"):
        Dashboard(throughput_window=1)
    with pytest.raises(ValueError, match="num_clips"):
        Dashboard(num_clips=-1)


def test_stage_configs_enable_the_dashboard() -> None:
    for name in ("stage1", "stage2", "instruct"):
        trainer = yaml.safe_load((CONF / f"{name}.yaml").read_text())["trainer"]
        paths = [c["class_path"] for c in trainer["callbacks"]]
        assert "slit_lightning.training.dashboard.Dashboard" in paths, name
        assert "lightning.pytorch.callbacks.LearningRateMonitor" in paths, name
        assert trainer["logger"]["init_args"]["default_hp_metric"] is False, name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for_runs(server: subprocess.Popen, base: str, runs: set[str]) -> dict:
    """The scalar tags by run once every run in ``runs`` is loaded (at most 90 s)."""
    tags, deadline = {}, time.monotonic() + 90
    while time.monotonic() < deadline and server.poll() is None:
        try:
            tags = json.loads(_get(f"{base}/data/plugin/scalars/tags"))
            if runs <= set(tags):
                return tags
        except OSError:
            pass
        time.sleep(0.5)
    stderr = server.stderr.read1().decode()[-2000:] if server.poll() is not None else ""
    raise AssertionError(f"tensorboard did not serve {runs} (has {set(tags)}): {stderr}")


def test_tensorboard_serves_the_loss_curves_and_final_metrics(
    log_root: Path, stage1_logs: Path, stage2_logs: Path
) -> None:
    runs = {str(p.relative_to(log_root)) for p in (stage1_logs, stage2_logs)}
    port = _free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_root)]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        tags = _wait_for_runs(server, base, runs)
        stage1, stage2 = sorted(runs)
        assert {"train/loss", "train/loss_atc", "train/grad_norm", "val/t2a_R@1"} <= set(
            tags[stage1]
        )
        query = urllib.parse.urlencode({"run": stage1, "tag": "train/loss"})
        series = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert len(series) == 4 and all(np.isfinite(value) for _, _, value in series)
        # the HPARAMS tab: each run with its own final metrics
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        groups = _post(
            f"{base}/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": statuses, "colParams": [],
             "startIndex": 0, "sliceSize": 10},
        )["sessionGroups"]  # fmt: skip
        final = {
            g["name"]: {m["name"]["tag"]: m["value"] for m in g["metricValues"]} for g in groups
        }
        assert set(final) == runs
        last_r1 = _events(stage1_logs).Scalars("val/t2a_R@1")[-1].value
        assert final[stage1]["val/t2a_R@1"] == pytest.approx(last_r1)
        assert "train/loss_lm" in final[stage2] and "val/t2a_R@1" not in final[stage2]
    finally:
        server.kill()
        server.wait(timeout=10)
