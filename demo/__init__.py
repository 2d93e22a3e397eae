"""``mvn-core demo``: the rules training a real model across backends and frameworks, and
``mvn-core claims``: the MVN-Grad paper's numerical claims, reproduced."""
