#!/bin/sh
# Migrate the Vagrant lab's guest disk from src to dst and back (README, "Lab"), from the host
# that ran `vagrant up`: vagrant/lab-migrate.sh [svmotion migrate options, e.g. --stun-strategy legacy]
set -eu
cd "$(dirname "$0")"
name=$(date +%Y%m%d-%H%M%S)
vagrant ssh dst -c "sudo /vagrant/vagrant/migrate.sh prepare $name"
vagrant ssh src -c "sudo /vagrant/vagrant/migrate.sh there $name $*"
vagrant ssh src -c "sudo /vagrant/vagrant/migrate.sh back $name $*"
