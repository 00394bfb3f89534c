"""A null-modem cable between two serial ends, made of two pseudo-terminals: the loop that
plugs it copies bytes between their master sides, so what one slave end writes the other reads
(pymodbus's RTU server on ``a``, the device under test on ``b``)."""

from __future__ import annotations

import asyncio
import os
import tty


class NullModem:
    def __init__(self) -> None:
        pairs = (os.openpty(), os.openpty())
        for master, slave in pairs:
            tty.setraw(master)
            tty.setraw(slave)
        (self._m1, self._s1), (self._m2, self._s2) = pairs
        self.a, self.b = os.ttyname(self._s1), os.ttyname(self._s2)  # the two serial ends

    def plug(self) -> None:
        """Start copying, on the running loop (the one that later unplugs)."""
        loop = asyncio.get_running_loop()

        def pump(src: int, dst: int) -> None:
            try:
                os.write(dst, os.read(src, 4096))
            except OSError:
                pass

        loop.add_reader(self._m1, pump, self._m1, self._m2)
        loop.add_reader(self._m2, pump, self._m2, self._m1)

    def unplug(self) -> None:
        """Stop copying, on the loop that plugged it."""
        loop = asyncio.get_running_loop()
        for fd in (self._m1, self._m2):
            loop.remove_reader(fd)

    def close(self) -> None:
        for fd in (self._m1, self._s1, self._m2, self._s2):
            os.close(fd)
