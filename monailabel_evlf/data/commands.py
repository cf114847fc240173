"""``evlf make-sample-data``: a folder of synthetic CT studies that MONAI Label serves as a local datastore."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def make_sample_data(args: argparse.Namespace) -> int:
    from monailabel_evlf.data.phantoms import write_sample_dataset  # lazy: monai; keeps `evlf --help` fast

    study_ids = write_sample_dataset(
        args.out_dir,
        n=args.n,
        seed=args.seed,
        dicom=args.dicom,
        kinds=args.kinds,
        organs=args.organs,
        **({"shape": args.shape} if args.shape else {}),
    )
    logger.info("wrote %d studies to %s", len(study_ids), args.out_dir)
    print("\n".join(study_ids))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-sample-data",
        help="write synthetic abdominal CT phantoms with known lesions (NIfTI, sidecar JSON, optional DICOM)",
        description=__doc__,
    )
    parser.add_argument("out_dir", help="output folder (use it as `monailabel start_server --studies OUT_DIR`)")
    parser.add_argument("--n", type=int, default=8, help="number of studies (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed, same files (default 0)")
    parser.add_argument("--dicom", action="store_true", help="also write a DICOM CT series per study under dicom/")
    # names are checked by the generator (its error lists them), so `evlf --help` needs no numpy/scipy import
    parser.add_argument(
        "--kinds", nargs="+", metavar="KIND", help='restrict lesion kinds, e.g. "cyst" "ring-enhancing lesion"'
    )
    parser.add_argument("--organs", nargs="+", metavar="ORGAN", help='restrict host organs, e.g. liver "left kidney"')
    parser.add_argument(
        "--shape", nargs=3, type=int, metavar=("I", "J", "K"), default=None, help="voxels per volume (default 96 96 40)"
    )
    parser.set_defaults(func=make_sample_data)
