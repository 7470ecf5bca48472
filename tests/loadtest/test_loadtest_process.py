"""The launcher's ports: a data-parallel server binds --port and one more per worker, so it gets a
block of free ports, drawn below the ephemeral range, where no client connection's local end can
take one of them between the check and the server's bind."""
from __future__ import annotations

import socket

from loadtest.process import ephemeral_ports_start, free_port, ports_needed


def test_a_data_parallel_server_gets_a_block_of_free_ports_below_the_ephemeral_range():
    assert ports_needed(["--no-engram"]) == 1
    assert ports_needed(["--engram", "x", "--data-parallel-size", "2"]) == 3
    assert ports_needed(["--data-parallel-size=4"]) == 5
    base = free_port(count=3)
    assert 10000 <= base and base + 3 <= ephemeral_ports_start()
    held = [socket.create_server(("127.0.0.1", port)) for port in range(base, base + 3)]
    for sock in held:
        sock.close()
