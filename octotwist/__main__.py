"""C{python -m octotwist} is the C{octo} command."""

from octotwist.cli import main

main()
