package testutil

import (
	"encoding/binary"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// SendShortIPv4 sends, through a packet socket on link ifindex of the calling thread's network
// namespace, one Ethernet frame from srcMAC to dstMAC holding an IPv4 header from src to dst
// whose total length (10) is shorter than the header itself, followed by UDP ports 5555 →
// 7777: a datapath must drop it as a malformed IP packet (drop_bad_ip).
func SendShortIPv4(ifindex int, srcMAC, dstMAC net.HardwareAddr, src, dst [4]byte) error {
	var be [2]byte // the socket wants ETH_P_IP in network order
	binary.BigEndian.PutUint16(be[:], unix.ETH_P_IP)
	proto := binary.NativeEndian.Uint16(be[:])
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(proto))
	if err != nil {
		return fmt.Errorf("packet socket: %w", err)
	}
	defer unix.Close(fd)
	frame := make([]byte, 14+20+8)
	copy(frame[0:6], dstMAC)
	copy(frame[6:12], srcMAC)
	binary.BigEndian.PutUint16(frame[12:], unix.ETH_P_IP)
	ip := frame[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 10) // total length shorter than the header
	ip[8], ip[9] = 64, unix.IPPROTO_UDP
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[20:], 5555)
	binary.BigEndian.PutUint16(ip[22:], 7777)
	sa := &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifindex, Halen: 6}
	copy(sa.Addr[:], dstMAC)
	if err := unix.Sendto(fd, frame, 0, sa); err != nil {
		return fmt.Errorf("send the malformed frame: %w", err)
	}
	return nil
}
