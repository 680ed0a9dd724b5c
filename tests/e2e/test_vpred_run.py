"""Issue 29's must-show on the tiny SDXL: v-prediction with zero terminal SNR over an epsilon model trains, the
exported folder's scheduler says so (and `sdtune sample` samples with it), and the single file written from
it carries the markers sdtune's loader reads back. (ComfyUI's own detection of a full-size file:
bench/client_vpred.py.)"""

import json

import torch
from PIL import Image
from support.helpers import runner

from sdtune.cli import app
from sdtune.export import export_single_file
from sdtune.family.load import load_components

V_ZTSNR = ("--set", "train.prediction_type=v_prediction", "--set", "train.zero_terminal_snr=true",
           "--set", "train.snr_gamma=5")


def test_sdxl_v_prediction_with_zero_terminal_snr_trains_exports_and_samples(tiny_sdxl, images, tmp_path):
    out = tmp_path / "out"
    trained = runner.invoke(app, ["train", "--preset", "cpu", "--data", str(images), "--model", str(tiny_sdxl),
                                  "--out", str(out), "--max-steps", "2", *V_ZTSNR])
    assert trained.exit_code == 0, trained.output
    assert "train.prediction_type=v_prediction: " in trained.output and "predicts epsilon" in trained.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["prediction_type"], scheduler["rescale_betas_zero_snr"],
            scheduler["timestep_spacing"]) == ("EulerDiscreteScheduler", "v_prediction", True, "trailing")

    components = load_components(str(out))
    assert (components.prediction_type, components.zero_terminal_snr) == ("v_prediction", True)
    written = export_single_file(components, tmp_path, force=True)  # tiny sizes, which no client reads: forced
    from_file = load_components(str(written.path), config=str(tiny_sdxl))  # the base's configs say epsilon
    assert (from_file.prediction_type, from_file.zero_terminal_snr) == ("v_prediction", True)

    result = runner.invoke(app, ["sample", "--ckpt", str(out), "--prompt", "a red circle", "--num-images", "1",
                                 "--steps", "2", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "samples" / "000-seed0.png")
    assert "Sampler: Euler," in image.text["parameters"]
