"""octotwist's conformance kit, run against this transport:

pytest --octo-transport unixcred
"""

from octotwist.testing.conformance import *  # noqa: F403
