"""The names the service's Ray actors find each other by.

Below the roles (actors/, controller/) and the entry points that start them, so that each
of them imports these downward and no two copies can drift apart.
"""

NAMESPACE = "harvest"  # the Ray namespace of every harvest actor (controller, workers, keepers)
CONTROLLER_NAME = "harvest-controller"
