package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/agent/api"
)

// nsfsMagic is the filesystem type of namespace files (linux/magic.h NSFS_MAGIC).
const nsfsMagic = 0x6e736673

// checkNetNS makes sure path is a network namespace before anything is allocated for the
// sandbox, so a wrong CNI_NETNS fails with a message that says so, not with a netlink error
// after an address was taken.
func checkNetNS(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("pod network namespace %s (CNI_NETNS) does not exist: the sandbox is gone or the runtime passed a wrong path", path), "")
	}
	if err != nil {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("open pod network namespace %s (CNI_NETNS)", path), err.Error())
	}
	defer f.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("stat pod network namespace %s (CNI_NETNS)", path), err.Error())
	}
	if st.Type != nsfsMagic {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("CNI_NETNS %s is not a network namespace (filesystem type %#x, not nsfs): pass the sandbox's netns path", path, st.Type), "")
	}
	kind, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("query the namespace type of %s (CNI_NETNS)", path), err.Error())
	}
	if kind != unix.CLONE_NEWNET {
		return types.NewError(api.CodeIOFailure, fmt.Sprintf("CNI_NETNS %s is a namespace but not a network namespace (type %#x)", path, kind), "")
	}
	return nil
}
