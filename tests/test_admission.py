"""Admission by expected wait (issue 34): a request whose work ahead, at the measured seconds per megapixel,
would pass its deadline is refused at once with Retry-After; the others are admitted. The real Batcher."""
import pytest

from app.batcher import ADMIT_SHARE, Batcher, LargeCost, WaitTooLong


def test_admission_counts_the_work_ahead_against_the_deadline():
    b = Batcher(None, max_batch=4, max_wait_s=0.01, queue_size=100)
    with b.slot() as first:
        first.expect(4_000_000, False, 10.0)  # no rate measured yet: admitted by count alone
    assert b.waiting_s["batch"] == 0  # its slot closed: its work is gone
    b.rates["batch"].observe(2.0, 1.0)  # 2 s per megapixel
    held = []
    try:
        for _ in range(4):  # 4 x 1 MP = 8 s, the share of a 10 s deadline
            ctx = b.slot()
            slot = ctx.__enter__()
            held.append(ctx)
            slot.expect(1_000_000, False, 10.0)
        assert b.waiting_s["batch"] == pytest.approx(8.0)  # seconds
        with b.slot() as late, pytest.raises(WaitTooLong) as refused:
            late.expect(1_000_000, False, 10.0)
        assert refused.value.retry_after >= 1 and "deadline" in refused.value.detail
        with b.slot() as large:  # the large lane keeps its own count and rate
            large.expect(1_000_000, True, 10.0)
    finally:
        for ctx in held:
            ctx.__exit__(None, None, None)
    assert b.waiting_s == {"batch": 0.0, "large": 0.0} and b.admitted == 0
    with b.slot() as again:
        again.expect(1_000_000, False, 10.0)  # the work ahead left: admitted
    assert ADMIT_SHARE < 1


def test_a_large_paintings_estimate_has_a_part_for_the_network_and_a_part_for_the_photos_pixels():
    """At the default stroke scale the network paints about one megapixel whatever the photo, while the decode,
    the upsampling and the encode follow the photo's pixels: a 36 MP photo is not three times a 12 MP one."""
    cost = LargeCost()
    assert cost.estimate(12_000_000, 750_000) is None  # nothing timed yet
    cost.calibrate(per_painted_mp=0.8, per_mp=0.05)  # as timed at start on a 12 MP photo painted at 0.75 MP
    assert cost.estimate(12_000_000, 750_000) == pytest.approx(0.6 + 0.6)
    assert cost.estimate(36_000_000, 1_000_000) == pytest.approx(0.8 + 1.8)  # 2.6 s, not 3 x 1.2
    for _ in range(20):  # real paintings take twice the estimate: the estimate follows them
        cost.observe(2 * 2.6, 36_000_000, 1_000_000)
    assert cost.estimate(36_000_000, 1_000_000) == pytest.approx(5.2, rel=0.01)
    first = LargeCost()
    first.observe(3.0, 30_000_000, 1_000_000)  # no timing at start: one rate from the first painting
    assert first.estimate(30_000_000, 1_000_000) == pytest.approx(3.0)


def test_a_burst_of_large_photos_is_admitted_while_it_fits_the_deadline_and_refused_at_once_after():
    b = Batcher(None, max_batch=4, max_wait_s=0.01, queue_size=64)
    b.large_cost.calibrate(per_painted_mp=0.8, per_mp=0.05)  # 2.6 s a 36 MP photo
    admitted, refused, held = 0, [], []
    try:
        for _ in range(16):
            ctx = b.slot()
            slot = ctx.__enter__()
            held.append(ctx)
            try:
                slot.expect(36_000_000, True, 30.0, painted=1_000_000)
                admitted += 1
            except WaitTooLong as exc:
                refused.append(exc.retry_after)
    finally:
        for ctx in held:
            ctx.__exit__(None, None, None)
    assert admitted == int(30.0 * ADMIT_SHARE // 2.6)  # 9 x 2.6 s = 23.4 s fits the 24 s share, a 10th does not
    assert len(refused) == 16 - admitted and all(r >= 1 for r in refused)


def test_a_reservation_from_the_header_counts_until_its_slot_takes_it_or_its_hold_runs_out():
    """A large upload admitted from its header holds its work in the lane (the next one is judged behind it);
    its slot takes that work over without judging it again; one whose body is slow lets go after its hold."""
    import asyncio

    from app.batcher import Reservation

    async def run() -> None:
        b = Batcher(None, max_batch=4, max_wait_s=0.01, queue_size=64)
        b.large_cost.calibrate(per_painted_mp=0.8, per_mp=0.05)  # 2.6 s a 36 MP photo painted at 1 MP
        first = b.reserve(36_000_000, 1_000_000, 30.0)
        assert b.waiting_s["large"] == pytest.approx(2.6)
        held = [b.reserve(36_000_000, 1_000_000, 30.0) for _ in range(8)]  # 9 x 2.6 = 23.4 s of the 24 s share
        with pytest.raises(WaitTooLong):
            b.reserve(36_000_000, 1_000_000, 30.0)
        with b.slot() as slot:  # the first one's body is in: admitted without a second judgement
            slot.expect(36_000_000, True, 30.0, painted=1_000_000, reserved=first)
            assert first.seconds == 0 and b.waiting_s["large"] == pytest.approx(23.4)
        for r in held:
            r.release()
        assert b.waiting_s["large"] == pytest.approx(0.0, abs=1e-9)
        slow = Reservation(b, 2.6, hold_s=0.05)  # a header, then a body that trickles
        assert b.waiting_s["large"] == pytest.approx(2.6)
        await asyncio.sleep(0.2)
        assert slow.seconds == 0 and b.waiting_s["large"] == pytest.approx(0.0, abs=1e-9)

    asyncio.run(run())


def test_a_place_is_held_from_the_headers_until_the_slot_takes_it_or_the_hold_runs_out():
    """Issue 34, item 6: a request holds its place in the queue from its headers (``ArrivalHold``), so the rest of
    a burst beyond the queue is refused as it arrives, not once every upload is read; its slot takes that place
    over without judging it again; a body that trickles lets its place go after the hold."""
    import asyncio

    from app.batcher import ArrivalHold, QueueFull

    async def run() -> None:
        b = Batcher(None, max_batch=4, max_wait_s=0.01, queue_size=2)
        first, second = b.hold(), b.hold()
        assert b.hold() is None and isinstance(b.full(), QueueFull)  # the third of the burst, as it arrives
        with b.slot(first):  # the first body is in: it takes its own place
            assert (b.admitted, b.arriving) == (1, 1)
            with pytest.raises(QueueFull):  # no place for a request that held none
                with b.slot():
                    pass
        second.release()  # the request ended before its body was in
        assert (b.admitted, b.arriving) == (0, 0) and b.full() is None
        slow = ArrivalHold(b, hold_s=0.05)  # headers, then a body that trickles
        assert b.arriving == 1
        await asyncio.sleep(0.2)
        assert b.arriving == 0 and not slow.take()  # let go: its slot is judged as any request's
        with b.slot(slow):
            assert (b.admitted, b.arriving) == (1, 0)
        assert (b.admitted, b.arriving) == (0, 0)

    asyncio.run(run())


def test_the_real_server_refuses_a_burst_of_large_photos_at_admission_and_paints_the_rest(tmp_path):
    """Issue 34, item 1, against the real server: before any large painting, the service has timed one at start
    (its first estimate is in /metrics); a burst of 12 MP photos sized from that estimate to be about 1.5 times
    what fits the deadline is split into paintings (200) and refusals at admission by expected wait (503 with
    Retry-After, counted by monet_refused_by_wait_total{lane="large"}), never a late 503 or a 504."""
    import io
    import math
    import re
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from model.weights import save_generator
    from tests.conftest import Server, photo, small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator(ngf=16, n_blocks=2))
    deadline_s = 12.0
    srv = Server(weights, ui="false", request_timeout_s=deadline_s).wait_ready()
    try:
        ready_by = time.time() + 180
        while not httpx.get(srv.url + "/info").json()["painting"]["large_ready"] and time.time() < ready_by:
            time.sleep(0.3)
        metrics = httpx.get(srv.url + "/metrics").text
        rate = float(re.search(r'^monet_seconds_per_megapixel\{lane="large"\} (\S+)$', metrics, re.M).group(1))
        assert rate > 0  # timed at start, before any large request
        buf = io.BytesIO()
        photo(4000, 3000, seed=1).save(buf, "JPEG", quality=90)
        body = buf.getvalue()
        n = min(40, math.ceil(1.5 * ADMIT_SHARE * deadline_s / (rate * 12)) + 2)

        def one(_):
            return httpx.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"},
                              params={"format": "jpeg"}, timeout=120)

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        statuses = [r.status_code for r in answers]
        refusals = [r for r in answers if r.status_code == 503]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1 and refusals, statuses
        assert all(int(r.headers["retry-after"]) >= 1 and "deadline" in r.json()["detail"] for r in refusals)
        metrics = httpx.get(srv.url + "/metrics").text
        by_wait = float(re.search(r'^monet_refused_by_wait_total\{lane="large"\} (\S+)$', metrics, re.M).group(1))
        assert by_wait == len(refusals)  # every refusal at admission, none at the deadline
    finally:
        srv.stop()


def test_the_large_lanes_estimate_learns_work_not_the_wait_for_the_large_budget(tmp_path):
    """A large painting's time in the server is learnt from its decode to its answer; the time it waited for the
    large-painting budget (queueing behind the others of a burst) is not work. With a budget that holds one
    12 MP photo at a time, four sent at once wait up to three paintings each; counted as work, that wait
    pushed the lane's estimate up by the queue's length and the next burst was admitted by too little."""
    import io
    import re
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from model.weights import save_generator
    from tests.conftest import Server, photo, small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator(ngf=16, n_blocks=2))
    # 12 MP: its decode (36 MB) + the painting's buffers (8 B/px, 96 MB) fit 160 MB once, not twice
    srv = Server(weights, ui="false", request_timeout_s=120, decode_budget_bytes=160 * 2**20).wait_ready()
    try:
        ready_by = time.time() + 180
        while not httpx.get(srv.url + "/info").json()["painting"]["large_ready"] and time.time() < ready_by:
            time.sleep(0.3)
        buf = io.BytesIO()
        photo(4000, 3000, seed=2).save(buf, "JPEG", quality=90)
        body = buf.getvalue()

        def one(_=None):
            r = httpx.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"},
                           params={"format": "jpeg"}, timeout=120)
            assert r.status_code == 200, r.text
            return r

        def estimate() -> float:
            text = httpx.get(srv.url + "/metrics").text
            return float(re.search(r'^monet_seconds_per_megapixel\{lane="large"\} (\S+)$', text, re.M).group(1))

        for _ in range(3):  # alone, one after another: the estimate settles on the work itself
            one()
        alone = estimate()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(4)))
        # the last of four waited about three paintings for the budget: counted as work, the estimate rose ~2.5x
        assert estimate() < 1.45 * alone, (alone, estimate())
    finally:
        srv.stop()


def test_a_large_photo_the_lane_cannot_take_is_refused_from_its_header_before_its_body_is_sent(tmp_path):
    """Issue 34, item 1: with the large lane full (a burst has been refused by expected wait), a 48 MP photo whose
    first 256 KiB alone have been sent (multipart, as browsers and curl send) gets its 503 with Retry-After
    before the client sends the rest. The client then sends the rest anyway, as HTTP clients do: the server
    discards it, the connection is not reset, and the next request on it is answered. A client that never
    sends the rest is closed after the upload timeout."""
    import io
    import json
    import math
    import re
    import socket
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from model.weights import save_generator
    from tests.conftest import Server, photo, small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator(ngf=16, n_blocks=2))
    deadline_s, upload_timeout_s = 12.0, 4.0
    srv = Server(weights, ui="false", request_timeout_s=deadline_s, upload_timeout_s=upload_timeout_s).wait_ready()
    try:
        ready_by = time.time() + 180
        while not httpx.get(srv.url + "/info").json()["painting"]["large_ready"] and time.time() < ready_by:
            time.sleep(0.3)
        rate = float(re.search(r'^monet_seconds_per_megapixel\{lane="large"\} (\S+)$',
                               httpx.get(srv.url + "/metrics").text, re.M).group(1))
        buf = io.BytesIO()
        photo(4000, 3000, seed=3).save(buf, "JPEG", quality=90)
        jpeg = buf.getvalue()
        n = min(40, math.ceil(2 * ADMIT_SHARE * deadline_s / (rate * 12)) + 2)

        def refused_by_wait() -> float:  # 0 until the first refusal creates the lane's count
            found = re.search(r'^monet_refused_by_wait_total\{lane="large"\} (\S+)$',
                              httpx.get(srv.url + "/metrics").text, re.M)
            return float(found.group(1)) if found else 0.0

        def one(_):
            return httpx.post(srv.url + "/translate", content=jpeg, headers={"content-type": "image/jpeg"},
                              params={"format": "jpeg"}, timeout=120).status_code

        # the probe: 48 MP, about three of the burst's 12 MP photos of work, so it is refused while the lane
        # still holds its share less a painting or two that have started meanwhile
        from PIL import Image

        probe = io.BytesIO()
        Image.effect_noise((800, 600), 40).convert("RGB").resize((8000, 6000), Image.BILINEAR).save(
            probe, "JPEG", quality=85)
        boundary = "monetboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = head + probe.getvalue() + tail
        first = 256 * 1024
        request = (f"POST /translate?format=jpeg HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()

        def refused(sock) -> None:
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                    re.search(rb"content-length: (\d+)", answer, re.I).group(1)):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            status_line, rest = answer.split(b"\r\n", 1)
            assert status_line.split()[1] == b"503", answer[:500]
            headers, detail = rest.split(b"\r\n\r\n", 1)
            assert int(re.search(rb"retry-after: (\d+)", headers, re.I).group(1)) >= 1
            assert "deadline" in json.loads(detail)["detail"]
        with ThreadPoolExecutor(n) as pool:
            burst = [pool.submit(one, i) for i in range(n)]
            while refused_by_wait() < 1 and not all(f.done() for f in burst):
                time.sleep(0.02)
            assert refused_by_wait() >= 1  # the lane holds more than its deadline's share: this one is refused
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(request)
                sock.sendall(body[:first])  # the rest is not sent until the answer has come
                refused(sock)
                sock.sendall(body[first:])  # as a client that sends its whole body before reading would
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                again = b""
                while b"\r\n\r\n" not in again:
                    chunk = sock.recv(65536)
                    assert chunk, again  # closed or reset: the discarded body cost the connection
                    again += chunk
                assert again.split()[1] == b"200", again[:300]
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as stalled:
                stalled.sendall(request + body[:first])
                refused(stalled)  # and then never sends the rest: closed after the upload timeout
                started = time.monotonic()
                assert stalled.recv(65536) == b""
                assert time.monotonic() - started < upload_timeout_s + 5
            statuses = [f.result() for f in burst]
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        assert re.search(r'^monet_connections_refused_total\{reason="body_timeout"\} 1\.0$',
                         httpx.get(srv.url + "/metrics").text, re.M)
    finally:
        srv.stop()


def test_the_image_head_is_found_in_the_first_bytes_of_a_multipart_body():
    """The look at a body's first bytes finds the part named `image` (not one whose name only starts so), and
    nothing when its part header has not arrived yet."""
    from app.uploads import image_head

    body = (b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.txt"\r\n\r\nnot this\r\n'
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="b.jpg"\r\nContent-Type: image/jpeg\r\n'
            b'\r\n\xff\xd8\xff\xe0rest')
    assert image_head(body, multipart=True) == b"\xff\xd8\xff\xe0rest"
    assert image_head(body[:60], multipart=True) is None
    assert image_head(b"\xff\xd8\xff", multipart=False) == b"\xff\xd8\xff"
