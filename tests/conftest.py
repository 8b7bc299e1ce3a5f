import os

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``laperm argv`` in-process; returns (exit code, stdout, stderr)."""
    from laperm.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
