"""mgc.runtime: checkpoint reading, execution of the tensor graph, and the sharded writer."""
