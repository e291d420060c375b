from twisted.application.service import ServiceMaker

octo = ServiceMaker(
    "octotwist", "octotwist.tap", "Serve an octotwist MapReduce job to workers.", "octo"
)
