"""PID 1 of the Boxpark guest (placeholder until the real init lands).

Writes one line to the console and powers the machine off, so that the image builder can prove a boot.
"""

import os


def main() -> None:
    try:
        os.makedirs("/proc", exist_ok=True)
        with open("/dev/console", "w") as console:
            console.write("boxpark-init: started (placeholder)\n")
    except OSError:
        pass
    if os.getpid() == 1:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        os.sync()
        libc.reboot(0x4321FEDC)  # RB_POWER_OFF
        while True:
            os.pause()


if __name__ == "__main__":
    main()
