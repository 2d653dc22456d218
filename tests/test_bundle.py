"""The repository is a MONAI bundle: the documented `python -m monai.bundle` commands work offline."""

import json
import subprocess
import sys

import pydicom
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import ROOT


def bundle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def result_of(folder):
    (result,) = [p for p in folder.iterdir() if p.is_dir()]
    uids = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in result.glob("*.dcm"))
    return result.name, uids, json.loads((result / "result.json").read_text())["heatmap"]


# (sample, CLI options, the same as bundle overrides)
CASES = [
    ("idc_mosaic_tail.png", [], []),
    ("CT_small.dcm", [], []),
    ("cmu_small_region.svs", [], []),
    ("cmu_small_region.svs",
     ["--crop", "foreground", "--tile-size-um", "400", "--precision", "fp32", "--backend", "torch", "--threshold", "0.4"],
     ["--crop", "foreground", "--tile_size_um", "400", "--precision", "fp32", "--backend", "torch", "--threshold", "0.4"]),
    ("idc_mosaic_tail.png", ["--crop", "template", "--crop-size", "300x400", "--rotate", "90", "--zoom", "0.8"],
     ["--crop", "template", "--crop_size", "[300, 400]", "--rotate", "90", "--zoom", "0.8"]),
]


@pytest.mark.parametrize("sample,options,overrides", CASES, ids=[f"{c[0]}{'-options' if c[1] else ''}" for c in CASES])
def test_bundle_inference_writes_what_the_cli_writes(sample, options, overrides, run_cli, data_dir, tmp_path):
    bundle("run", "--config_file", "configs/inference.json", "--input", data_dir / sample, "--output_dir", tmp_path / "bundle",
           *overrides)
    done = run_cli("analyze", data_dir / sample, "--out", tmp_path / "cli", "--quiet", *options)
    assert done.returncode == 0, done.stderr
    assert result_of(tmp_path / "bundle") == result_of(tmp_path / "cli")


def test_bundle_settings_change_the_result(data_dir, tmp_path):
    """An override the config does not read would leave the default result (same UIDs)."""
    bundle("run", "--config_file", "configs/inference.json", "--output_dir", tmp_path / "default")
    bundle("run", "--config_file", "configs/inference.json", "--output_dir", tmp_path / "cropped", "--crop", "foreground")
    assert result_of(tmp_path / "default")[0] != result_of(tmp_path / "cropped")[0]


@pytest.mark.parametrize("config,override,message", [
    ("inference", ["--crop_sise", "3"], "unknown override --crop_sise for configs/inference.json; its settings are: "),
    ("train", ["--crop_sise", "3"], "unknown override --crop_sise"),
    ("evaluate", ["--crop_sise", "3"], "unknown override --crop_sise"),
    ("inference", ["--crop", "foregroud"], "crop must be 'foreground' or 'template', got 'foregroud'"),
    ("inference", ["--grid", "8y12"], "grid must be two whole numbers (rows, cols) such as 8x12, got '8y12'"),
    ("inference", ["--input", "no-such.png"], "no-such.png: no such file or folder"),
    ("train", ["--test_fold", "9"], "test_fold"),
])
def test_bundle_mistake_is_one_line_with_status_2(config, override, message, tmp_path):
    """A typo in an override is refused as the command line refuses one: one line on stderr
    naming it, exit status 2, no traceback, nothing written."""
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}.json",
                           *override, "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    shown = done.stderr.replace("\r", "\n")  # as a terminal shows it: a progress bar clears its line
    errors = [line for line in shown.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("monai.bundle: error: ") and message in errors[0], done.stderr
    assert shown.rstrip().endswith(errors[0])
    assert not any(tmp_path.iterdir())  # nothing ran


def test_bundle_grid_is_written_as_on_the_command_line(data_dir, tmp_path):
    bundle("run", "--config_file", "configs/inference.json", "--output_dir", tmp_path, "--grid", "4x6")
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    grid = json.loads((folder / "result.json").read_text())["grid"]
    assert (grid["rows"], grid["cols"]) == (4, 6)


def test_bundle_inference_default_runs_on_the_embedded_sample(tmp_path):
    bundle("run", "--config_file", "configs/inference.json", "--output_dir", tmp_path)
    name, uids, heatmap = result_of(tmp_path)
    assert len(set(uids)) == 3 and name.startswith("2.25.")  # SC, PM, SR in a folder named by UID
    # the embedded mosaic (400 x 600 px) on the default grid, its tumour focus found
    (grid,) = heatmap  # one slice
    assert (len(grid), len(grid[0])) == (8, 12)
    scores = [v for row in grid for v in row if v is not None]
    assert all(0.0 <= v <= 1.0 for v in scores) and max(scores) >= 0.5


@pytest.mark.parametrize("config,kind", [("configs/inference.json", "infer"), ("configs/train.json", "train")])
def test_workflow_properties(config, kind):
    workflow = ConfigWorkflow(config_file=str(ROOT / config), meta_file=str(ROOT / "configs/metadata.json"),
                              logging_file=str(ROOT / "configs/logging.conf"), workflow_type=kind, bundle_root=str(ROOT))
    workflow.initialize()
    assert workflow.check_properties() == []


def test_metadata_and_network_verify_offline():
    done = bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "configs/metadata_schema.json")
    assert "metadata is verified with no error" in done.stdout + done.stderr
    done = bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")
    assert "verified with no error" in done.stdout + done.stderr


def test_metadata_schema_rejects_missing_fields(tmp_path):
    metadata = json.loads((ROOT / "configs/metadata.json").read_text())
    del metadata["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(broken),
                           "--filepath", str(ROOT / "configs/metadata_schema.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "network_data_format" in done.stdout + done.stderr  # refused for the field taken away


@pytest.mark.parametrize("how", [[], ["--use_trace", "True", "--input_shape", "[1, 3, 48, 48]"]], ids=["scripted", "traced"])
def test_torchscript_export_gives_the_eager_scores(how, tmp_path):
    exported = tmp_path / "model.ts"
    bundle("ckpt_export", "network_def", "--filepath", exported, "--ckpt_file", "models/model.pt", "--meta_file",
           "configs/metadata.json", "--config_file", "configs/inference.json", *how)
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/inference.json")
    network = parser.get_parsed_content("network_def")
    state = torch.load(ROOT / "models/model.pt", weights_only=True)
    network.load_weights(state)
    network.eval()
    scripted = torch.jit.load(exported)
    tiles = torch.rand(16, 3, 48, 48) * 4 - 2
    with torch.no_grad():
        assert (scripted(tiles) - network(tiles)).abs().max().item() <= 1e-5


def test_train_and_evaluate_bundles_on_a_tiny_set(tmp_path):
    bundle("run", "--config_file", "configs/train.json", "--max_epochs", "1", "--test_fold", "3", "--output_dir", tmp_path / "train")
    model = tmp_path / "train" / "model.pt"
    assert model.is_file() and (tmp_path / "train" / "checkpoint.pt").is_file()
    record = json.loads((tmp_path / "train" / "training.json").read_text())
    assert record["settings"]["epochs"] == 1 and len(record["test"]["head_auc"]) == 13
    bundle("run", "--config_file", "configs/evaluate.json", "--model_path", model, "--output_dir", tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["tiles"] == 48 and 0 <= metrics["auc"] <= 1
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0
    # the evaluation bundle restricted to a list of patients
    patients = tmp_path / "patients.txt"
    patients.write_text("# two patients of fold 3\n12875\n9291\n")
    bundle("run", "--config_file", "configs/evaluate.json", "--model_path", model, "--patients_file", patients,
           "--output_dir", tmp_path / "eval2")
    metrics = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert metrics["patients"] == 2 and metrics["patient_list"] == ["12875", "9291"] and metrics["tiles"] == 5


def test_metadata_names_the_spec_schema_and_large_files_hold_the_weights():
    """The model zoo's tools: `schema` is the spec's URL (verify_metadata downloads it unless
    --filepath holds it, as above); large_files.yml names the weights with their sha256."""
    metadata = json.loads((ROOT / "configs/metadata.json").read_text())
    assert metadata["schema"].startswith("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/")
    done = bundle("download_large_files", "--bundle_path", ".")
    assert "Verified 'model.pt'" in done.stdout + done.stderr and "skipped downloading" in done.stdout + done.stderr
