"""Large uploads shrunk where they enter, so TorchServe never moves megabytes.

An upload of any format above SHRINK_MIN_BYTES (or SHRINK_MIN_PIXELS) is decoded here with the
handler's own rules (serving/images.py: the pixel limits, JPEG draft mode, integer reduction, EXIF,
RGB, the 32x32 resize) and forwarded as the network's 32x32 input, a lossless PNG of a few KB; an
explanation's PNG also names the decoded picture's size (its heatmap follows that size). Both give
the handler exactly the pixels the whole file would have given it. A large upload the handler would refuse
is refused here with the handler's status and message; a decompression bomb of any size gets the
handler's 413 on its header, before any pixel is decoded. Small files and SHRINK_UPLOADS=0 go on
as they are, once their header was read here too (an upload that is no image is refused here, whatever its size).

Decoding runs in a pool of SHRINK_WORKERS threads, never on the event loop (Pillow releases the GIL
while it decodes, resizes and encodes). What waits for the pool is bounded by the in-flight caps
(limits.py): the uploads are already held; a thread holds at most one decoded picture (a JPEG at
1/8 scale, or up to 16 MP of another format). An upload waits for a thread in its client's line
(serving/fair_pool.py: a free thread goes to the waiting client with the fewest there; first come, first
served let one client's uploads, 16 MP PNGs of a few KB each, hold every thread while the others' photos
waited their whole wait) at most SHRINK_WAIT_S, then gets 503 + Retry-After: dozens of 16 MP uploads queued
ahead must not hold everyone else's answers for many seconds. A small upload's header is read on the loop (tens of
microseconds): only one that declares many pixels goes to the pool.
"""
from __future__ import annotations

import logging

from serving.fair_pool import FairPool, NoThreadInTime
from serving.images import ImageRequestError, open_upload, page_shrink_rules, shrunk_png, worth_shrinking
from serving.throttled_log import ThrottledLog

from .config import Settings
from .errors import ClassifyError
from .request_context import note_busy

log = logging.getLogger("adapter.shrink")

SHRINK_BUSY_MESSAGE = "The server is busy shrinking other photos; try again shortly."


class UploadShrinker:
    def __init__(self, settings: Settings):
        self.enabled = settings.shrink_uploads
        self.min_bytes = settings.shrink_min_bytes
        # Shrinking or not: a large upload's header is read in the pool (a 10 MB PNG's checksums take milliseconds).
        self._pool = FairPool(settings.shrink_workers, "shrink")
        self.wait_s = settings.shrink_wait_s
        self.retry_after = {"Retry-After": str(settings.retry_after_s)}
        self.refusals = ThrottledLog(log)

    def page_rules(self) -> dict | None:
        """What the page shrinks, and how (GET /settings); None: send every file as it is."""
        return page_shrink_rules(self.min_bytes) if self.enabled else None

    async def prepare(self, data: bytes | bytearray, explain: bool = False, client: str = "") -> bytes | bytearray:
        """The body to forward for this upload of ``client`` (limits.client_address): itself, or its shrunk PNG;
        ClassifyError for an image the handler would refuse."""
        try:
            if len(data) <= self.min_bytes:
                # The header (and a small PNG's checksums) only. Not an image: refused here with the
                # handler's words, not forwarded (a JSON "image" would reach the handler as a v1/v2
                # request of up to 64 images); a bomb: before any pixel is decoded.
                img = open_upload(data)
                if not self._worth_shrinking(img, len(data)):
                    return data
                return await self._in_pool(client, shrunk_png, img, explain)
            return await self._in_pool(client, self._shrink_large, data, explain)
        except ImageRequestError as err:
            raise ClassifyError(err.status, err.message) from None

    async def _in_pool(self, client: str, work, *args):
        """work(*args) on a pool thread in ``client``'s turn, within wait_s; else 503 busy."""
        try:
            return await self._pool.run(client, work, *args, wait_s=self.wait_s)
        except NoThreadInTime:
            self.refusals.warning("503 (shrink busy): no thread free to shrink an upload of %s within %g s",
                                  client, self.wait_s)
            note_busy("shrink_wait")
            raise ClassifyError(503, SHRINK_BUSY_MESSAGE, self.retry_after) from None

    def _worth_shrinking(self, img, size: int) -> bool:
        return self.enabled and worth_shrinking(img, size, self.min_bytes)

    def _shrink_large(self, data: bytes | bytearray, explain: bool) -> bytes | bytearray:
        img = open_upload(data)
        return shrunk_png(img, explain) if self._worth_shrinking(img, len(data)) else data

    def close(self) -> None:
        self._pool.close()
