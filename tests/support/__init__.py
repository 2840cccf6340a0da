"""What the tests share that is not a fixture: data generators, fault points, an S3 server, a stand-in network,
the `imzarr` command in a child process and store comparisons. Test modules import from here, never from each other."""
