"""Bad-input matrix: the command line (machinery and rules: tests/_bad_inputs.py)."""

from __future__ import annotations

from _bad_inputs import Cases

cases = Cases()
case = cases.case


def _t():
    import torch

    return torch


# -- command line ----------------------------------------------------------------------------

def _cli(argv, module="fastdiff.cli"):
    """Runs a CLI main(); argparse's exit becomes SystemExit with its stderr as the message."""
    import contextlib
    import importlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as e:
            raise SystemExit(f"exit {e.code}: {err.getvalue()}") from None
    if code:
        raise SystemExit(f"exit {code}: {err.getvalue()}")


@case("SystemExit", "--dtype")
def cli_compare_unknown_dtype(keep):
    _cli(["compare", "--dtype", "float8"])


@case("SystemExit", "command")
def cli_unknown_command(keep):
    _cli(["frobnicate"])


@case("SystemExit", "--num-samples")
def cli_generate_zero_samples(keep):
    _cli(["--num-samples", "0", "--out", "/nonexistent/never-made"], "fastdiff.generate")


@case("SystemExit", "--steps")
def cli_generate_non_integer_steps(keep):
    _cli(["--num-samples", "2", "--out", "/nonexistent/x", "--steps", "two"],
         "fastdiff.generate")


@case("SystemExit", "--guidance")
def cli_generate_nan_guidance(keep):
    _cli(["--num-samples", "2", "--out", "/nonexistent/x", "--guidance", "nan"],
         "fastdiff.generate")


@case("SystemExit", "--shape")
def cli_compare_bad_shape(keep):
    _cli(["compare", "--shape", "2xfoo"])


@case("SystemExit", "--guidance")
def cli_sample_nan_guidance(keep):
    _cli(["sample", "--guidance", "nan", "--out", "/nonexistent/x.png"])


@case("SystemExit", "--steps")
def cli_sample_zero_steps(keep):
    _cli(["sample", "--steps", "0", "--out", "/nonexistent/x.png"])


@case("ArgumentTypeError", "--labels")
def cli_sample_bad_labels(keep):
    from fastdiff.sample_cli import _parse_labels
    _parse_labels("3,12")



def _sample_cli(argv):
    """`fastdiff sample argv`, failing loudly if it gets as far as loading the model: the
    argument errors below must come before any sampling work."""
    import fastdiff.models.digits as digits

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded: the bad argument was not caught first")

    digits.load_digits_model = no_work
    _cli(["sample", *argv])


@case("SystemExit", "argument --out")
def cli_sample_out_in_a_missing_folder(keep):
    _sample_cli(["--out", "/nonexistent/x/y.png"])


@case("SystemExit", "argument --out")
def cli_sample_out_is_a_folder(keep):
    _sample_cli(["--out", "/"])


@case("SystemExit", "argument --out")
def cli_sample_out_not_an_image_format(keep):
    import tempfile
    _sample_cli(["--out", f"{tempfile.gettempdir()}/digits.notanimage"])


@case("SystemExit", "argument --npz")
def cli_sample_npz_in_a_missing_folder(keep):
    _sample_cli(["--npz", "/nonexistent/x.npz", "--out", "/nonexistent/x.png"])


@case("SystemExit", "argument --device")
def cli_sample_device_not_a_device(keep):
    _sample_cli(["--device", "gpu0"])


@case("SystemExit", "argument --device")
def cli_sample_device_absent(keep):
    _sample_cli(["--device", "cuda:99"])


@case("SystemExit", "argument --backend")
def cli_sample_backend_for_another_device(keep):
    _sample_cli(["--device", "cpu", "--backend", "cuda"])


@case("SystemExit", "argument --seed")
def cli_sample_seed_overflow(keep):
    _sample_cli(["--seed", str(2**64)])


@case("SystemExit", "argument --device")
def cli_compare_device_not_a_device(keep):
    _cli(["compare", "--device", "gpu0"])

results, test_bad_input = cases.tests(__file__)
