"""The pages under AppTest see the server settings ``dora-dashboard`` passes by default."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def loopback_server():
    """``server.address`` as the command sets it (127.0.0.1): a test that needs a served
    dashboard sets another address itself. Without this, AppTest's default (no address: every
    interface) would make every page refuse typed paths."""
    try:
        from streamlit import config
    except ImportError:  # the tests that need streamlit skip themselves
        yield
        return
    from dora_analysis.app.serve import HOST

    previous = config.get_option("server.address")
    config.set_option("server.address", HOST)
    yield
    config.set_option("server.address", previous)
