import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from her2score.cli import main  # noqa: E402
from her2score.cnn import load_model  # noqa: E402
from her2score.labels import parse_score  # noqa: E402
from her2score.stain import H_DAB  # noqa: E402
from her2score.synthetic import write_dataset  # noqa: E402
from her2score.train import (  # noqa: E402
    TrainConfig,
    _Renderer,
    csv_images,
    folder_images,
    synthetic_images,
    train,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(threads=1, max_epochs=4, patience=10, patches_per_image=24, batch_size=32, val_fraction=0.25,
            val_patches_per_image=8, lr=4e-3, width=8)


@pytest.fixture(scope="module")
def fields():
    return synthetic_images(3, seed=5, size_px=(192, 192))


@pytest.fixture(scope="module")
def trained(fields, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    rows = []
    res = train(fields, config=TrainConfig(seed=3, **TINY), out=out, name="tiny.pt", data_note="test", progress=rows.append)
    return res, out, rows


def test_the_weights_record_lists_the_training_images_read_from_files(trained, fields, tmp_path):
    """Images read from files are recorded by content (files.content_sample), so that evaluate can tell them;
    generated fields are not files (their seeds are in the data note)."""
    from PIL import Image

    from her2score.files import content_sample
    from her2score.train import LabelledImage

    res, _, _ = trained
    assert res.record.training["image_samples"] == []  # the fixture's fields are generated, not files
    png = tmp_path / "a.png"
    Image.fromarray(fields[0].rgb).save(png)
    from_file = [LabelledImage(f.rgb, f.label, str(png) if i == 0 else f.source) for i, f in enumerate(fields)]
    again = train(from_file, config=TrainConfig(seed=3, **TINY))
    assert again.record.training["image_samples"] == [content_sample(png)]


def test_training_reads_labels_as_evaluation_does():
    """One parser for both commands: the five-level labels train as their score (null and ultralow as 0)."""
    assert [parse_score(x) for x in ("0", "1+", "2PLUS", " 3plus ", "null", "0+ (ultralow)", "Ultra-low", "3 +", "2")] == \
        ["0", "1+", "2+", "3+", "0", "0", "0", "3+", "2+"]
    with pytest.raises(ValueError, match="unknown label"):
        parse_score("4+")


def test_training_loss_falls_and_log_is_written(trained):
    res, out, rows = trained
    losses = [r["train_loss"] for r in res.log["epochs"]]
    assert len(losses) == 4 and rows == res.log["epochs"]
    assert losses[-1] < losses[0]
    assert (out / "tiny.pt").exists() and (out / "tiny.train_log.csv").exists()
    log = json.loads((out / "tiny.train_log.json").read_text())
    assert log["record"]["sha256"] == res.record.sha256 and log["config"]["seed"] == 3
    assert res.record.training["images"] == 12 and res.record.training["val_images"] == 4
    assert set(res.log["epochs"][0]) >= {"train_loss", "val_loss", "val_patch_accuracy", "val_image_accuracy", "seconds"}
    # the rate each epoch's last step used: one-cycle, up 15% of the way then annealed down to the last step
    # (the scheduler's rate after its final step wraps back up: the last two epochs logged one value)
    lrs = [r["lr"] for r in res.log["epochs"]]
    assert lrs[1] > lrs[2] > lrs[3] > 0 and len(set(lrs)) == 4, lrs
    assert lrs[-1] == pytest.approx(TINY["lr"] / 25 / 1e4, rel=1e-3)  # the schedule's floor, where the run ends


def test_trained_weights_round_trip(trained):
    res, out, _ = trained
    model = load_model(out / "tiny.pt", device="cpu")
    assert model.record.sha256 == res.record.sha256
    x = np.random.default_rng(1).uniform(0, 1, (4, 2, 64, 64)).astype(np.float32)
    res.net.eval()
    with torch.no_grad():
        ref = torch.softmax(res.net(model.normalise(torch.from_numpy(x))), 1).numpy()
    np.testing.assert_array_equal(model.predict_patches(x), ref)


def test_training_is_deterministic(fields, trained, tmp_path):
    """The same seed and threads give the same weights and the same file: its SHA-256 is the model's name in every
    result (the training time, stored in the file, made every run's another; it is in the training log)."""
    cfg = TrainConfig(seed=3, **{**TINY, "max_epochs": 1})
    a = train(fields, config=cfg, out=tmp_path / "a")
    b = train(fields, config=cfg, out=tmp_path / "b")
    for (k, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.record.sha256 == b.record.sha256 and a.weights.read_bytes() == b.weights.read_bytes()
    assert a.log["seconds"] > 0 and "seconds" not in a.record.training


def test_renderer_without_augmentation_is_deconvolution():
    rgb = np.random.default_rng(0).integers(40, 255, (2, 16, 16, 3), dtype=np.uint8)
    bg = np.full((2, 3), 250.0)
    r = _Renderer(TrainConfig(), torch.device("cpu"))
    got = r(rgb, bg, None).numpy()
    from her2score.stain import deconvolve

    want = np.moveaxis(deconvolve(rgb[1], H_DAB.with_background((250, 250, 250)))[..., :2], -1, 0)
    np.testing.assert_allclose(got[1], want, atol=1e-4)
    aug = r(rgb, bg, np.random.default_rng(0)).numpy()
    assert aug.shape == got.shape and not np.allclose(aug, got)


def test_stain_augmentation_keeps_dab_near_its_amount():
    """A pure-DAB patch stays mostly DAB after re-rendering with perturbed vectors (<= 12 degrees)."""
    r = _Renderer(TrainConfig(), torch.device("cpu"))
    od = 0.5 * np.array(H_DAB.dab)
    pix = np.round(250 * 10 ** (-od)).astype(np.uint8)
    rgb = np.broadcast_to(pix, (64, 8, 8, 3)).copy()
    out = r(rgb, np.full((64, 3), 250.0), np.random.default_rng(2)).numpy()
    dab = out[:, 1].mean(axis=(1, 2))
    assert np.all(dab > 0.35) and np.all(dab < 0.7)


def test_folder_and_csv_sources(tmp_path):
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=2, size_px=(96, 96))
    rows = list(csv.DictReader(open(ds / "labels.csv")))
    imgs = csv_images(ds / "labels.csv")
    assert [i.label for i in imgs] == [r["label"] for r in rows] and imgs[0].rgb.shape == (96, 96, 3)
    root = tmp_path / "classes"
    for r in rows:
        d = root / r["label"].replace("+", "plus")
        d.mkdir(parents=True, exist_ok=True)
        (d / "a.png").write_bytes((ds / r["path"]).read_bytes())
    (root / "notaclass").mkdir()
    got = folder_images(root)
    assert sorted(i.label for i in got) == ["0", "1+", "2+", "3+"]
    (root / "0").rename(root / "null")  # evaluate's five-level folder names train too
    (root / "0+").mkdir()
    (root / "0+" / "b.png").write_bytes((root / "null" / "a.png").read_bytes())
    assert sorted(i.label for i in folder_images(root)) == ["0", "0", "1+", "2+", "3+"]
    excel = tmp_path / "excel.csv"  # a spreadsheet's export: any case, five-level labels, empty unnamed columns
    excel.write_text("Path,Label,,\n" + "".join(f"{ds / r['path']},{'null' if r['label'] == '0' else r['label']},,\n"
                                                 for r in rows))
    assert [i.label for i in csv_images(excel)] == [r["label"] for r in rows]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimages/x.png,5+\n")
    with pytest.raises(ValueError, match="bad.csv, line 2"):
        csv_images(bad)
    bad.write_text("path,label,\nimages/x.png,1+,oops\n")
    with pytest.raises(ValueError, match="line 2: 'oops' lies in a column without a name"):
        csv_images(bad)


def test_train_needs_two_images_of_a_class(fields):
    one = list({im.label: im for im in fields}.values())  # one image of each class
    with pytest.raises(ValueError, match="at least two"):
        train(one, config=TrainConfig(**TINY))


def test_train_refuses_a_class_without_images(fields):
    """A model trained without a class never predicts it: refused, naming the class (it trained, with a warning)."""
    with pytest.raises(ValueError, match=r"no usable image of class 0: a model trained without a class never predicts it"):
        train([im for im in fields if im.label != "0"], config=TrainConfig(**TINY))


def test_cli_train_requires_a_source(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "training source" in capsys.readouterr().err


def test_cli_train_refuses_a_real_he_image_as_scoring_does_before_any_training(capsys, tmp_path):
    """A real H&E field listed for training was trained on as HER2 IHC: refused now, naming the file and why
    (imagecheck.check_image, as scoring refuses it), before any image is used; an H-DAB field beside it is taken."""
    from conftest import save_png
    from realdata import real_cases

    he = next((c for c in real_cases() if c.name == "he-torchstain-breast-source"), None)
    if he is None:
        pytest.skip("the real H&E images (../shared/data/real) are not on this machine")
    ihc = write_dataset(tmp_path / "ihc", n_per_class=1, seed=2, size_px=(96, 96))
    field = save_png(tmp_path / "he field.png", he.load(), mpp=he.mpp)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{ihc / next(csv.DictReader(open(ihc / 'labels.csv')))['path']},0\n{field.name},2+\n")
    assert main(["train", "--csv", str(labels), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"her2score train: {field}: ") and "H&E" in captured.err and "not a training image" in captured.err
    assert "training" not in captured.out and not (tmp_path / "out").exists()


def test_train_reads_images_with_the_backend_given(capsys, tmp_path):
    """--backend as for score: a reader that cannot read a listed image refuses it, naming the file and why, before
    any training; the reader the images choose themselves reads them alike."""
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=3, size_px=(96, 96))
    assert [i.rgb.tobytes() for i in csv_images(ds / "labels.csv", backend="image")] == [
        i.rgb.tobytes() for i in csv_images(ds / "labels.csv")]
    first = ds / next(csv.DictReader(open(ds / "labels.csv")))["path"]
    assert main(["train", "--csv", str(ds / "labels.csv"), "--out", str(tmp_path / "out"), "--backend", "tifffile"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"her2score train: {first}: tifffile reads TIFF files; this is a PNG image (the image backend "
                            "reads it)\n"), captured.err
    assert not (tmp_path / "out").exists()


def test_cli_train_refuses_the_shipped_weights_and_a_file_as_out_before_any_work(capsys, tmp_path):
    """Training into models/ would replace the weights every default run uses: refused unless asked for
    (--replace-shipped), as is an --out that is a file, both before any field is generated."""
    from her2score.cnn import default_weights_path

    shipped = default_weights_path()
    before = shipped.read_bytes()
    assert main(["train", "--synthetic", "2", "--out", str(shipped.parent)]) == 2
    assert "is the shipped weights" in capsys.readouterr().err and shipped.read_bytes() == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--synthetic", "2", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"{afile}: a file, not a folder for the weights (--out; out= in the Python API)" in err and "generating" not in err


def test_the_api_refuses_the_shipped_weights_too(fields):
    """train() itself refuses models/ (a review: the API replaced the shipped weights, ONNX graph and logs in silence,
    and every default run then failed their checksum), before any training."""
    from her2score.cnn import default_weights_path

    shipped = default_weights_path()
    before = {p.name: p.read_bytes() for p in shipped.parent.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"is the shipped weights, .+replace_shipped=True"):
        train(fields, config=TrainConfig(max_epochs=1, seed=3), out=str(shipped.parent))
    assert {p.name: p.read_bytes() for p in shipped.parent.iterdir() if p.is_file()} == before


def test_training_fields_may_carry_unstained_border_texture(fields):
    from her2score.synthetic import Confounders, generate_field

    def seed_of(f):
        return int(f.source.split("seed=")[1].split(":")[0])

    assert all(f.source.endswith("border_od=0.0000") for f in fields)  # the default: the generator's clean borders
    assert np.array_equal(fields[0].rgb, generate_field("0", seed=seed_of(fields[0]), size_px=(192, 192), confounders=Confounders()).image)
    textured = synthetic_images(2, seed=5, size_px=(192, 192), border_od_max=0.03)
    drawn = [float(f.source.rsplit("border_od=", 1)[1]) for f in textured]
    assert all(0 <= d <= 0.03 for d in drawn) and len(set(drawn)) == len(drawn)  # one draw per field
    assert seed_of(textured[0]) == seed_of(fields[0]) and not np.array_equal(textured[0].rgb, fields[0].rgb)


def test_a_diverging_run_saves_nothing_and_nan_weights_are_refused(fields, tmp_path, trained):
    cfg = TrainConfig(seed=3, **{**TINY, "max_epochs": 2, "lr": 1e30})
    with pytest.raises(ValueError, match="training diverged at epoch 1 .*nothing was saved"):
        train(fields, config=cfg, out=tmp_path, name="nan.pt")
    assert not list(tmp_path.iterdir())
    from her2score.cnn import ModelError, _sha256_state, save_model

    blob = torch.load(trained[1] / "tiny.pt", weights_only=True)  # a file with NaN weights, written by hand
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = torch.full_like(blob["state_dict"][key], float("nan"))
    meta = json.loads(blob["meta"])
    meta["state_sha256"] = _sha256_state(blob["state_dict"])
    blob["meta"] = json.dumps(meta, sort_keys=True)
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(ModelError, match="nan.pt: the weights hold NaN"):
        load_model(tmp_path / "nan.pt", device="cpu")
    net = load_model(trained[1] / "tiny.pt", device="cpu").net
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(ModelError, match="again.pt: not saved: the weights hold NaN"):
        save_model(tmp_path / "again.pt", net, trained[0].record)
    assert not (tmp_path / "again.pt").exists()


def test_what_would_spoil_a_training_run_is_refused_before_it(fields, tmp_path):
    """An image given twice (it could sit in both splits), a weights name whose ONNX graph would be written over
    it (model.onnx), and a time limit that is not a positive number of minutes (0 was read as no limit)."""
    with pytest.raises(ValueError, match=r"the same image as .* \(images 1 and 13, labelled 0 and 0\)"):
        train([*fields, fields[0]], config=TrainConfig(**TINY))
    with pytest.raises(ValueError, match=r"model\.onnx: a weights file's name ends in \.pt"):
        train(fields, config=TrainConfig(**TINY), out=tmp_path, name="model.onnx")
    assert not any(tmp_path.iterdir())
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_minutes must be a positive number"):
            TrainConfig(max_minutes=bad)
        with pytest.raises(ValueError, match="threads must be at least 1"):
            TrainConfig(threads=bad)  # 0 ran one thread and recorded 0


def test_labels_that_contradict_themselves_are_refused_before_training(tmp_path):
    """A review's trials: a row whose level column says 0 (null) beside label 3+ trained as 3+ (evaluate refuses it),
    and a 3+ field copied into the null folder beside its original trained under both labels, one of them perhaps
    in the validation split."""
    import shutil

    from her2score.files import content_sample
    from her2score.synthetic import generate_field, write_dataset
    from her2score.train import csv_images, folder_images

    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=8, size_px=(96, 96))
    rows = (ds / "labels.csv").read_text().splitlines()
    three = next(i for i, r in enumerate(rows) if ",3+," in r)
    rows[three] = rows[three].rsplit(",", 1)[0] + ",0 (null)"
    (ds / "bad.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line \d+: level '0 \(null\)' does not agree with label '3\+'"):
        csv_images(ds / "bad.csv")
    for score in ("3+", "null"):
        (tmp_path / "cls" / score).mkdir(parents=True)
    shutil.copy(next((ds / "images").glob("field_3plus_*.png")), tmp_path / "cls" / "3+" / "a.png")
    shutil.copy(next((ds / "images").glob("field_3plus_*.png")), tmp_path / "cls" / "null" / "copy.png")
    with pytest.raises(ValueError, match=r"copy\.png: the same image as .*a\.png \(images 1 and 2, labelled 3\+ and 0\)"):
        train(folder_images(tmp_path / "cls"), config=TrainConfig(**TINY))
    # fields of one size whose first and last 64 KiB are alike (glass margins, uncompressed) are other images
    import tifffile

    shutil.rmtree(tmp_path / "cls")
    for score, seed in (("0", 3), ("1+", 3), ("2+", 3), ("3+", 3), ("3+", 4)):
        rgb = generate_field(score, seed=seed).image.copy()
        rgb[:60], rgb[-60:] = 255, 255
        (tmp_path / "cls" / score).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "cls" / score / f"f{seed}.tif", rgb, photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")
    assert len({content_sample(p) for p in (tmp_path / "cls").rglob("*.tif")}) == 1
    assert len(train(folder_images(tmp_path / "cls"), config=TrainConfig(**{**TINY, "max_epochs": 1})).log["epochs"]) == 1


def test_retrained_weights_written_where_the_shipped_ones_are_get_their_graph(trained, tmp_path, monkeypatch):
    """The model card's retraining command writes into models/: the new weights and their ONNX graph are both
    written (the graph was made by loading the file back, which the shipped file's checksum refused, after the
    weights were already replaced)."""
    import onnx

    from her2score import cnn

    shipped = tmp_path / "her2cnn.pt"
    monkeypatch.setattr(cnn, "default_weights_path", lambda: shipped)
    res, _, _ = trained
    rec = cnn.save_model(shipped, res.net, res.record)
    meta = {p.key: p.value for p in onnx.load(str(shipped.with_suffix(".onnx"))).metadata_props}
    assert meta[cnn.ONNX_SOURCE_KEY] == rec.sha256 == cnn._sha256_file(shipped)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_field_is_made(tmp_path, capsys):
    """train found an unwritable --out only when training ended (a traceback, exit 1, the run lost)."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "tr"
    assert main(["train", "--synthetic", "2", "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr()
    assert f"{out}: cannot write the weights there (Not a directory)" in err.err and "generating" not in err.out
