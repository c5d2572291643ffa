"""Build progress from TensorRT's log: the layer its tactic timing is at, and the layers it spent longest on."""

from __future__ import annotations

import io

from tests.conftest import requires_tensorrt
from trtnet.build_progress import AutotuneLog, BuildProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(log: AutotuneLog, clock: Clock, lines: list[tuple[float, str]]) -> None:
    for at, line in lines:
        clock.now = at
        log(line)


# the shape of TensorRT 8.x verbose lines (the names are ours): a layer's costs, then its timing runners
EIGHT_X = [
    (0.0, "Original: 302 layers"),
    (1.0, "=============== Computing costs for model.0.conv + model.0.act"),
    (1.5, "*************** Autotuning format combination: Half(1228800,409600,640,1) -> Half(...) ***************"),
    (2.0, "--------------- Timing Runner: model.0.conv + model.0.act (CaskConvolution)"),
    (9.0, "Tactic: 0x0000000000000001 Time: 0.0123"),
    (11.0, "=============== Computing costs for "),  # a version that names the layer on the runner line only
    (11.5, "--------------- Timing Runner: {ForeignNode[model.22.box...model.22.out]} (Myelin)"),
    (12.0, "--------------- Timing Runner: another runner of the same layer (Myelin)"),
    (311.0, "=============== Computing costs for model.9.cv2"),
    (315.0, "Formats and tactics selection completed in 314 seconds."),
]


def test_the_layer_being_timed_and_the_longest_ones():
    clock = Clock()
    log = AutotuneLog(clock)
    assert log.summary() is None  # nothing timed yet (TensorRT-RTX builds may never say)
    feed(log, clock, EIGHT_X[:4])
    assert log.layers == 1 and log.phase == "timing layer 1: model.0.conv + model.0.act"
    feed(log, clock, EIGHT_X[4:6])
    assert log.layers == 2 and log.phase == "timing layer 2: …"
    feed(log, clock, EIGHT_X[6:])
    assert log.seconds["{ForeignNode[model.22.box...model.22.out]}"] == 300.0
    clock.now = 320.0
    log.finish()
    log.finish()  # closing twice counts nothing twice
    assert log.seconds == {"model.0.conv + model.0.act": 10.0, "{ForeignNode[model.22.box...model.22.out]}": 300.0,
                           "model.9.cv2": 9.0}
    assert log.summary(top=2) == ("tactic timing: 3 layers in 319 s; longest: "
                                  "{ForeignNode[model.22.box...model.22.out]} 300 s, model.0.conv + model.0.act 10 s")


def test_a_long_layer_name_is_shortened_in_the_summary():
    clock = Clock()
    log = AutotuneLog(clock)
    feed(log, clock, [(0.0, "=============== Computing costs for " + " + ".join(f"model.{i}.cv1" for i in range(20)))])
    clock.now = 5.0
    log.finish()
    name = log.summary().split("longest: ")[1]
    assert len(name) < 80 and name.endswith("… 5 s")


class Logger:  # compat.Logger's part that BuildProgress uses
    def __init__(self):
        self.listeners = []

    def log(self, msg: str) -> None:
        for listen in self.listeners:
            listen(msg)


def test_build_progress_listens_to_the_logger_only_during_the_build():
    logger = Logger()
    with BuildProgress(stream=io.StringIO(), logger=logger) as progress:
        assert logger.listeners
        logger.log("Some other message")
        assert progress.phase == "building"
        logger.log("=============== Computing costs for model.4.m.0.cv1")
        assert progress.phase == "timing layer 1: model.4.m.0.cv1"
    assert logger.listeners == []
    assert list(progress.autotune.seconds) == ["model.4.m.0.cv1"]  # closed when the build ended
    logger.log("=============== Computing costs for after the build")
    assert progress.autotune.layers == 1


@requires_tensorrt
def test_the_process_logger_hands_every_message_to_its_listeners():
    from trtnet import compat

    logger = compat.Logger()
    heard = []
    logger.listeners.append(heard.append)
    try:
        logger.log(compat.trt().ILogger.Severity.VERBOSE, "=============== Computing costs for x")
    finally:
        logger.listeners.remove(heard.append)
    assert heard == ["=============== Computing costs for x"]
