"""pylsl, loaded with liblsl's log quietened, and the LSL-to-DFDS type tables."""

from __future__ import annotations

import logging
import os

__all__ = ["LSL_DTYPES", "PROCESSING_FLAGS", "LostError", "LslTimeout", "pylsl"]

log = logging.getLogger(__name__)

try:
    import pylsl
    from pylsl.util import LostError
    from pylsl.util import TimeoutError as LslTimeout
except RuntimeError as exc:  # pylsl is installed but cannot find liblsl
    # The registry skips drivers whose import fails with ImportError ("auto" mode).
    raise ImportError(f"pylsl cannot load liblsl: {exc}", name="liblsl") from exc


# Where liblsl looks for its config file (after $LSLAPICFG), in its own order.
_LSL_CONFIG_FILES = ("lsl_api.cfg", "~/lsl_api/lsl_api.cfg", "/etc/lsl_api/lsl_api.cfg")


def _quiet_liblsl() -> None:
    """Keep liblsl's INFO lines ("Loaded default config") off every command's stderr.

    Only when the user has no lsl_api.cfg: configuration content replaces a file
    wholesale, and theirs may hold KnownPeers or multicast settings. liblsl reads its
    configuration once, on first use, so this must run before any other pylsl call.
    """
    if os.environ.get("LSLAPICFG"):
        return
    if any(os.path.exists(os.path.expanduser(path)) for path in _LSL_CONFIG_FILES):
        return
    try:
        pylsl.util.set_config_content("[log]\nlevel = -1\n")  # warnings and errors only
    except (AttributeError, NotImplementedError):  # liblsl older than 1.17.7
        log.debug("cannot lower liblsl's log level: this liblsl has no lsl_set_config_content")


_quiet_liblsl()


#: LSL channel format (pylsl ``cf_*``) -> DFDS dtype name. cf_undefined (0) cannot be
#: transmitted, so such outlets are not listed.
LSL_DTYPES: dict[int, str] = {
    pylsl.cf_float32: "f32",
    pylsl.cf_double64: "f64",
    pylsl.cf_string: "str",
    pylsl.cf_int32: "i32",
    pylsl.cf_int16: "i16",
    pylsl.cf_int8: "i8",
    pylsl.cf_int64: "i64",
}

# Timestamps on the consumer's clock: clocksync adds the inlet's time correction, so
# stamps made on another host are comparable with pylsl.local_clock() here. No dejitter:
# liblsl fits timestamps against the sample count, so a device that drops samples would
# get the gap smeared over its neighbours, and the fit needs 30-120 s to settle after
# every (re)connection; datamux passes on what the device stamped. Monotonize only clamps
# the small backward steps a refreshed time-correction estimate can cause, so frames stay
# ascending (the framer and replay of recordings rely on that).
PROCESSING_FLAGS = pylsl.proc_clocksync | pylsl.proc_monotonize
