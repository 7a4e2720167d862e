"""The runners' error boundary (engine/errors.py): expected failures end as one line on
stderr and exit code 1; anything else, or --debug / GLM_DEBUG=1, keeps the traceback."""
import errno
import os

import pytest
from safetensors import SafetensorError

from engine.errors import fail, one_line, run_main
from engine.parallel.failures import PeerError


class DivergenceError(RuntimeError):
    """Stands in for the divergence guard's error: matched by name, not imported."""


def _raises(err):
    def main(argv):
        raise err
    return main


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("GLM_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")


@pytest.mark.parametrize("err, line", [
    (ValueError("train.steps=2.5 must be an integer\nsecond line"),
     "train.steps=2.5 must be an integer"),
    (PeerError("rank 0 (stage 0): the loss all-reduce with rank 1 failed"),
     "rank 0 (stage 0): the loss all-reduce with rank 1 failed"),
    (FloatingPointError("loss became nan at step 3"), "loss became nan at step 3"),
    (DivergenceError("24 steps in a row skipped"), "24 steps in a row skipped"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint.tmp/model.st"),
     "disk full (no space left on device): runs/x/checkpoint.tmp/model.st"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"),
     "permission denied: /ro/run"),
    (FileExistsError(errno.EEXIST, "File exists", "runs/file"),
     "already exists (and is in the way): runs/file"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/tokenizer"),
     "No such file or directory: data/tokenizer"),
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                     'message: "No space left on device" })'),
     'disk full (no space left on device) writing safetensors: Error while serializing: '
     'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"),
     "unreadable or unwritable safetensors file: Error while deserializing header: "
     "HeaderTooLarge"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                  "[127.0.0.1]:43438: Connection reset by peer"),
     "a collective failed: [../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
     "[127.0.0.1]:43438: Connection reset by peer"),
])
def test_expected_failures_are_one_line_and_exit_1(err, line, capsys):
    assert one_line(err) == line
    with pytest.raises(SystemExit) as info:
        run_main(_raises(err), [])
    assert info.value.code == 1
    assert capsys.readouterr().err == f"error: {line}\n"


def test_bugs_and_debug_keep_the_traceback(monkeypatch):
    with pytest.raises(KeyError):                      # not an expected class: a bug
        run_main(_raises(KeyError("x")), [])
    with pytest.raises(ValueError):                    # --debug is taken off argv
        run_main(_raises(ValueError("bad")), ["--debug"])
    assert os.environ.pop("GLM_DEBUG") == "1"         # for the process: child ranks too
    monkeypatch.setenv("GLM_DEBUG", "1")
    with pytest.raises(OSError):
        run_main(_raises(OSError(errno.ENOSPC, "No space left on device")), [])


def test_argv_without_debug_and_exit_codes(capsys):
    seen = []
    with pytest.raises(SystemExit) as info:
        run_main(lambda argv: seen.append(argv) or 3, ["--a", "--debug", "b"])
    assert info.value.code == 3 and seen == [["--a", "b"]]
    os.environ.pop("GLM_DEBUG")                       # --debug set it for the process
    with pytest.raises(SystemExit) as info:
        run_main(_raises(KeyboardInterrupt()), [])
    assert info.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def test_each_rank_prints_one_line_naming_itself(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_main(_raises(ValueError("train.steps=2.5 must be an integer")), [])
    assert capsys.readouterr().err == "error: rank 1: train.steps=2.5 must be an integer\n"
    with pytest.raises(SystemExit):                   # already names its rank: no prefix
        run_main(_raises(PeerError("rank 1 (stage 1): step handshake failed")), [])
    assert capsys.readouterr().err == "error: rank 1 (stage 1): step handshake failed\n"
    # a runner's own `except ValueError as e: fail(e)` ends the same way
    with pytest.raises(SystemExit, match=r"^error: rank 1: bad input$"):
        try:
            raise ValueError("bad input")
        except ValueError as e:
            fail(e)
