import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from her2score import cnn  # noqa: E402
from her2score.cnn import (  # noqa: E402
    CLASSES,
    DEFAULT_WEIGHTS,
    ModelError,
    WeightsRecord,
    aggregate_tiles,
    build_network,
    count_parameters,
    default_weights_path,
    fuse,
    load_model,
    load_onnx_model,
    save_model,
    tissue_patches,
)
from her2score.eligibility import check_eligibility  # noqa: E402
from her2score.results import CnnReport, SlideResult  # noqa: E402
from her2score.stain import H_DAB, deconvolve, optical_density  # noqa: E402
from her2score.synthetic import generate_field  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network()
    net.eval()
    record = WeightsRecord(file="x.pt", sha256="", normalisation={"mean": [0.1, 0.05], "std": [0.2, 0.15]})
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    rec = save_model(path, net, record)
    return path, net, rec


def test_network_is_small():
    net = build_network()
    n = count_parameters(net)
    assert n == 77_556 and n < 1_000_000
    out = net(torch.zeros(3, 2, 64, 64))
    assert out.shape == (3, 4)


def test_save_load_round_trip(saved):
    path, net, rec = saved
    assert rec.file == "tiny.pt" and len(rec.sha256) == 64 and rec.parameters == 77_556
    assert path.stat().st_size < 2_000_000
    model = load_model(path, device="cpu")
    assert model.record.sha256 == rec.sha256 and model.classes == CLASSES
    x = np.random.default_rng(0).uniform(0, 0.8, (5, 2, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(net(model.normalise(torch.from_numpy(x))), 1).numpy()
    np.testing.assert_array_equal(model.predict_patches(x), ref)
    again = load_model(path, device=None)  # None: the CPU, as before the default became "cpu"
    assert again.device.type == "cpu"
    rgb = generate_field("2+", seed=3, size_px=(192, 160)).image
    p1, n1 = model.predict_tile(rgb, stains=H_DAB)
    p2, n2 = again.predict_tile(rgb, stains=H_DAB)
    assert n1 == n2 == 6  # 3 x 2 patches of 64 px, all tissue
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (4,) and abs(p1.sum() - 1) < 1e-5


def test_blank_tile_gives_no_patches(saved):
    model = load_model(saved[0], device="cpu")
    probs, n = model.predict_tile(np.full((200, 200, 3), 250, np.uint8), stains=H_DAB.with_background((250, 250, 250)))
    assert n == 0 and probs.shape == (4,) and not probs.any()
    probs, n = model.predict_tile(np.full((40, 30, 3), 255, np.uint8), stains=H_DAB)  # smaller than a patch
    assert n == 0


def test_patch_sampling_limits_and_spreads_patches(saved):
    model = load_model(saved[0], device="cpu")
    field = generate_field("2+", seed=12, size_px=(512, 512)).image
    all_probs, n_all = model.predict_tile(field, stains=H_DAB)
    some_probs, n_some = model.predict_tile(field, stains=H_DAB, max_patches=16)
    assert n_all == 64 and n_some == 16
    assert some_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert model.predict_tile(field, stains=H_DAB, max_patches=16)[0] == pytest.approx(some_probs)  # deterministic


def test_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="nothere.pt"):
        load_model(tmp_path / "nothere.pt")


def test_corrupt_file_is_a_model_error(tmp_path, saved):
    bad = tmp_path / "bad.pt"
    data = saved[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="bad.pt"):
        load_model(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="junk.pt"):
        load_model(junk)


def test_tampered_weights_fail_the_checksum(tmp_path, saved):
    blob = torch.load(saved[0], weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if v.dtype.is_floating_point)
    blob["state_dict"][key] = blob["state_dict"][key] + 0.01
    bad = tmp_path / "tampered.pt"
    torch.save(blob, bad)
    with pytest.raises(ModelError, match="tampered.pt.*checksum"):
        load_model(bad)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("mpp", float("nan"), "mpp must be a positive"), ("mpp", -1.0, "mpp must be a positive"),
    ("patch_px", 0, "patch_px must be"), ("min_tissue_fraction", 5, "min_tissue_fraction"),
    ("normalisation", {"mean": [0.1, 0.1], "std": [0.0, 0.2]}, "positive stds")])
def test_a_record_no_model_could_work_with_is_a_model_error(tmp_path, saved, key, value, words):
    """A weights file whose record (not covered by the weights' checksum) was edited or damaged: refused at
    load, naming the file (a NaN µm/px scored slides past the resolution check; a zero std failed each slide)."""
    import json

    blob = torch.load(saved[0], weights_only=True)
    meta = json.loads(blob["meta"])
    meta["record"][key] = value
    bad = tmp_path / "edited.pt"
    torch.save({"state_dict": blob["state_dict"], "meta": json.dumps(meta)}, bad)
    with pytest.raises(ModelError, match=f"edited.pt.*{words}"):
        load_model(bad)


def test_default_weights_sha_mismatch_and_missing(monkeypatch, tmp_path, saved):
    monkeypatch.setattr(cnn, "default_weights_path", lambda: saved[0])
    monkeypatch.setattr(cnn, "DEFAULT_WEIGHTS", WeightsRecord(file="tiny.pt", sha256="0" * 64))
    with pytest.raises(ModelError, match="does not match the shipped record"):
        load_model()
    with pytest.raises(ModelError, match="does not match the shipped record"):  # named by its path, as the CLI does
        load_onnx_model(str(saved[0]))
    monkeypatch.setattr(cnn, "default_weights_path", lambda: tmp_path / "her2cnn.pt")
    with pytest.raises(ModelError, match="her2cnn.pt.*not found.*--no-cnn"):
        load_model()


def test_shipped_weights_load_and_match_their_record():
    path = default_weights_path()
    if not path.exists():
        pytest.skip("no shipped weights in this checkout")
    model = load_model(device="cpu")
    assert model.record.sha256 == DEFAULT_WEIGHTS.sha256
    assert path.stat().st_size < 2_000_000
    assert model.record.parameters == count_parameters(model.net) < 1_000_000
    probs, n = model.predict_tile(generate_field("3+", seed=99).image, stains=H_DAB)
    assert n == 64 and abs(probs.sum() - 1) < 1e-5


# --------------------------------------------------------------------------- ONNX Runtime

def _real_patches(n_per_field: int = 8) -> np.ndarray:
    """Tissue patches of synthetic fields of every score, as the pipeline feeds the network."""
    out = []
    for i, score in enumerate(CLASSES):
        rgb = generate_field(score, seed=40 + i, size_px=(256, 256)).image
        out.append(tissue_patches(deconvolve(rgb), patch_px=64, max_patches=n_per_field)[0])
    return np.concatenate(out)


def test_shipped_onnx_graph_matches_torch_within_1e5():
    if not default_weights_path().exists():
        pytest.skip("no shipped weights in this checkout")
    fast, ref = load_onnx_model(), load_model(device="cpu")
    assert fast.source_sha256 == DEFAULT_WEIGHTS.sha256  # the shipped graph was used, not a new export
    assert fast.name == ref.name and fast.record == ref.record
    x = np.concatenate([_real_patches(), np.random.default_rng(1).uniform(0, 1.2, (16, 2, 64, 64)).astype(np.float32)])
    p_fast, p_ref = fast.predict_patches(x), ref.predict_patches(x)
    assert p_fast.shape == (len(x), 4)
    np.testing.assert_allclose(p_fast, p_ref, rtol=0, atol=1e-5)
    assert len(set(p_ref.argmax(1))) > 1  # the inputs really exercise the network


def test_save_model_exports_a_linked_onnx_graph(saved):
    path, net, rec = saved
    graph = path.with_suffix(".onnx")
    assert graph.is_file()
    fast = load_onnx_model(path)
    assert fast.source_sha256 == rec.sha256 and fast.record.sha256 == rec.sha256
    x = _real_patches(4)
    with torch.no_grad():
        ref = torch.softmax(net(load_model(path, device="cpu").normalise(torch.from_numpy(x))), 1).numpy()
    np.testing.assert_allclose(fast.predict_patches(x), ref, rtol=0, atol=1e-5)
    again = pickle.loads(pickle.dumps(fast))  # spawn/forkserver workers receive it pickled
    np.testing.assert_array_equal(again.predict_patches(x), fast.predict_patches(x))


def test_graph_from_other_weights_is_not_used(tmp_path, saved):
    """A .onnx left beside retrained weights is ignored: the weights are exported again in memory."""
    torch.manual_seed(5)
    other = save_model(tmp_path / "other.pt", build_network(), WeightsRecord(file="o.pt", sha256=""))
    shutil.copy(saved[0], tmp_path / "mine.pt")
    shutil.copy(tmp_path / "other.onnx", tmp_path / "mine.onnx")
    fast = load_onnx_model(tmp_path / "mine.pt")
    assert fast.source_sha256 == saved[2].sha256 != other.sha256
    x = _real_patches(2)
    np.testing.assert_allclose(fast.predict_patches(x), load_model(saved[0], device="cpu").predict_patches(x), rtol=0, atol=1e-5)


def test_a_process_reloads_weights_written_over_its_file(tmp_path, saved):
    """The batch's per-process model cache: new weights written over the same path are loaded, not the old ones."""
    from her2score.batch import _load_cnn

    path = tmp_path / "w.pt"
    shutil.copy(saved[0], path)
    first = _load_cnn(str(path))
    assert _load_cnn(str(path)) is first
    torch.manual_seed(6)
    save_model(path, build_network(), WeightsRecord(file="w.pt", sha256=""))
    second = _load_cnn(str(path))
    assert second is not first and second.source_sha256 != first.source_sha256


def test_unreadable_graph_is_a_model_error(tmp_path, saved):
    shutil.copy(saved[0], tmp_path / "w.pt")
    (tmp_path / "w.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="w.onnx"):
        load_onnx_model(tmp_path / "w.pt")
    with pytest.raises(ModelError, match="gone.pt.*not found"):
        load_onnx_model(tmp_path / "gone.pt")


def test_tissue_from_stain_od_matches_rgb_od():
    """tissue_patches finds tissue from stain OD (no second deconvolution): the same patches as the
    RGB OD criterion, on a field with glass in it."""
    rgb = generate_field("1+", seed=8, size_px=(320, 256)).image.copy()
    rgb[:, :150] = (236, 240, 244)  # glass over the left part, a little off the background
    stains = H_DAB.with_background((240.0, 242.0, 246.0))
    patches, pos = tissue_patches(deconvolve(rgb, stains), patch_px=64, stains=stains)
    od = optical_density(rgb, stains.background).sum(axis=2) > cnn.TISSUE_OD
    expect = [(r, c) for r in range(0, 256, 64) for c in range(0, 320, 64) if od[r:r + 64, c:c + 64].mean() >= 0.5]
    assert [tuple(p) for p in pos] == expect and 0 < len(expect) < 20
    hed = deconvolve(rgb, stains)
    r, c = expect[0]
    np.testing.assert_array_equal(patches[0], hed[r:r + 64, c:c + 64, :2].transpose(2, 0, 1))


def test_scoring_with_the_shipped_graph_never_imports_torch():
    """Start-up: import her2score, load the shipped CNN on ONNX Runtime and score a tile, without torch."""
    if not default_weights_path().exists():
        pytest.skip("no shipped weights in this checkout")
    code = ("import sys, her2score\n"
            "light = not {'numpy', 'cv2', 'scipy', 'torch'} & set(sys.modules)\n"
            "import numpy as np\n"
            "from her2score.cnn import load_onnx_model, use_one_thread\n"
            "m = load_onnx_model(); use_one_thread()\n"
            "p, n = m.predict_tile(np.full((128, 128, 3), (120, 90, 150), np.uint8))\n"
            "print(light, 'torch' in sys.modules, n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "4"]


# --------------------------------------------------------------------------- fusion

def test_fuse_agreement_and_confidence():
    score, conf = fuse("2+", [0.05, 0.1, 0.8, 0.05])
    assert score == "2+" and conf == pytest.approx(0.4 + 0.6 * 0.8)


def test_fuse_confident_cnn_overrides_classical():
    # classical 2+ gets 0.4 + 0.6 * 0.05 = 0.43; 3+ gets 0.6 * 0.9 = 0.54
    score, conf = fuse("2+", {"0": 0.0, "1+": 0.05, "2+": 0.05, "3+": 0.9})
    assert score == "3+" and conf == pytest.approx(0.54)


def test_fuse_tips_a_call_one_score_at_most():
    """The CNN's slide reading is a mean over every patch, blind to a minority of cells a guideline call may
    rest on (a gastric biopsy's 3+ cluster among HER2 0 fragments read 0 by the CNN, p=0.78 with the weights shipped until 0.4.6, was reported 0)."""
    assert fuse("3+", {"0": 0.78, "1+": 0.1, "2+": 0.07, "3+": 0.05}) == ("3+", pytest.approx(0.4 + 0.6 * 0.05))
    assert fuse("1+", {"0": 0.0, "1+": 0.05, "2+": 0.05, "3+": 0.9})[0] == "1+"  # 3+ is two scores off: not reached
    assert fuse("1+", {"0": 0.0, "1+": 0.05, "2+": 0.9, "3+": 0.05})[0] == "2+"  # a neighbour is
    assert fuse("0", {"0": 0.0, "1+": 0.9, "2+": 0.05, "3+": 0.05})[0] == "1+"


def test_fuse_moves_only_to_the_scores_it_is_given():
    """``to``: the scores the cells leave possible (the pipeline's); the CNN tips the call to no other."""
    p = {"0": 0.0, "1+": 0.05, "2+": 0.9, "3+": 0.05}
    assert fuse("1+", p, to=("2+",))[0] == "2+" and fuse("1+", p, to=("0",)) == ("1+", pytest.approx(0.4 + 0.6 * 0.05))
    assert fuse("1+", p, to=())[0] == "1+" and fuse("1+", p, to=("3+",))[0] == "1+"  # 3+ is two scores off still


def test_fuse_unsure_cnn_keeps_classical():
    # 3+ would need p(3+) - p(1+) > 2/3: 0.7 - 0.1 = 0.6 is not enough
    score, conf = fuse("1+", [0.1, 0.1, 0.1, 0.7])
    assert score == "1+" and conf == pytest.approx(0.4 + 0.06)


def test_fuse_exact_tie_goes_to_classical():
    # 0.4 + 0.6 * 0.1 = 0.46 vs 0.6 * (0.1 + 2/3) = 0.46
    p = np.array([0.1, 0.1, 0.1 + 2 / 3, 0.0])
    p[3] = 1 - p[:3].sum()
    score, _ = fuse("1+", p / p.sum())
    assert score == "1+"


def test_fuse_weights_and_errors():
    assert fuse("0", [0, 0, 0, 1], classical_weight=1.0) == ("0", 1.0)
    assert fuse("2+", [0, 0, 0.3, 0.7], classical_weight=0.0)[0] == "3+"
    s, c = fuse("2+", [2, 2, 4, 2])  # unnormalised input is normalised
    assert s == "2+" and 0 <= c <= 1
    with pytest.raises(ValueError):
        fuse("4+", [0.25] * 4)
    with pytest.raises(ValueError):
        fuse("0", [0.5, 0.5])
    with pytest.raises(ValueError):
        fuse("0", {"0": 1.0})
    with pytest.raises(ValueError):
        fuse("0", [0.25] * 4, classical_weight=1.5)


def test_aggregate_tiles_is_patch_weighted():
    rep = aggregate_tiles([(np.array([1.0, 0, 0, 0]), 3), (np.array([0, 0, 1.0, 0]), 1), (np.zeros(4), 0)], model="m")
    assert rep.tiles == 2 and rep.model == "m" and rep.score == "0"
    assert rep.probabilities == {"0": 0.75, "1+": 0.0, "2+": 0.25, "3+": 0.0}
    assert aggregate_tiles([(np.zeros(4), 0)], model="m") is None


def _result(classical, cnn_score=None, level=None):
    report = None
    if cnn_score:
        p = {c: (0.97 if c == cnn_score else 0.01) for c in CLASSES}
        report = CnnReport(cnn_score, p, 1, "m")
    fused = fuse(classical, report.probabilities) if report else (classical, None)
    return SlideResult(
        slide="s", score=fused[0], level=level or classical, flags=(), guideline="breast-asco-cap-2023",
        specimen="resection", reason="r", counts={"none": 100, "faint_partial": 400}, percentages={},
        tumour_cells=500, h_score=80.0, clusters={}, region="cells", qc=(), stains={}, mpp=0.5,
        tissue_area_mm2=0.1, classical_score=classical, cnn=report, confidence=fused[1])


def test_disagreement_needs_review_and_agreement_does_not():
    agree = _result("1+", "1+")
    assert check_eligibility(agree, "her2-low-breast").status == "eligible"
    differ = _result("1+", "0")
    d = check_eligibility(differ, "her2-low-breast")
    assert d.status == "needs_review"
    assert any("disagree" in r for r in d.reasons)


def test_the_shipped_weights_are_found_wherever_the_wheel_put_its_data_files(tmp_path):
    """pip --user, --prefix and a distribution's system pip put the wheel's data files (the weights) under a data
    folder other than sys.prefix: every default score then failed, naming a path that never exists. The installed
    record says where they went."""
    import importlib.metadata

    from her2score.cnn import _installed_model_file

    site = tmp_path / "prefix" / "lib" / "python3.11" / "site-packages"
    info = site / "her2score-0.5.3.dist-info"
    info.mkdir(parents=True)
    weights = tmp_path / "prefix" / "share" / "her2score" / "models" / "her2cnn.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: her2score\nVersion: 0.5.3\n")
    (info / "RECORD").write_text("her2score/__init__.py,,\n../../../share/her2score/models/her2cnn.pt,,\n"
                                 "../../../share/her2score/models/MODEL_CARD.md,,\n")
    dist = importlib.metadata.PathDistribution(info)
    assert _installed_model_file("her2cnn.pt", dist) == weights.resolve()
    assert _installed_model_file("her2cnn.onnx", dist) is None
