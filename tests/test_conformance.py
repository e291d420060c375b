"""The conformance kit, run against the transport under test (OCTO_TRANSPORT)."""

from octotwist.testing.conformance import *  # noqa: F403
