package ecsemu

import (
	"net/http"
	"sort"
	"strconv"
	"strings"
)

// Reply shapes. Field names and nesting follow the SDK's response structs
// (services/ecs and services/vpc of alibaba-cloud-sdk-go), which decode the JSON by these tags.

type wireTag struct {
	Key      string `json:"Key"`
	Value    string `json:"Value"`
	TagKey   string `json:"TagKey"`
	TagValue string `json:"TagValue"`
}

type wireTags struct {
	Tag []wireTag `json:"Tag"`
}

type wireSGs struct {
	SecurityGroupID []string `json:"SecurityGroupId"`
}

type wirePrivateIP struct {
	PrivateIPAddress string `json:"PrivateIpAddress"`
	Primary          bool   `json:"Primary"`
}

type wirePrivateIPSets struct {
	PrivateIPSet []wirePrivateIP `json:"PrivateIpSet"`
}

type wireAttachment struct {
	InstanceID   string `json:"InstanceId"`
	DeviceIndex  int    `json:"DeviceIndex"`
	AttachedTime string `json:"AttachedTime,omitempty"`
	// A member ENI names its trunk (DeviceIndex is then its VLAN id); a trunk ENI lists its
	// members (see trunk.go).
	TrunkNetworkInterfaceID   string            `json:"TrunkNetworkInterfaceId,omitempty"`
	MemberNetworkInterfaceIDs *wireMemberENIIDs `json:"MemberNetworkInterfaceIds,omitempty"`
}

type wireENI struct {
	NetworkInterfaceID   string            `json:"NetworkInterfaceId"`
	NetworkInterfaceName string            `json:"NetworkInterfaceName"`
	Description          string            `json:"Description"`
	Status               string            `json:"Status"`
	Type                 string            `json:"Type"`
	VpcID                string            `json:"VpcId"`
	VSwitchID            string            `json:"VSwitchId"`
	ZoneID               string            `json:"ZoneId"`
	MacAddress           string            `json:"MacAddress"`
	PrivateIPAddress     string            `json:"PrivateIpAddress"`
	InstanceID           string            `json:"InstanceId"`
	CreationTime         string            `json:"CreationTime"`
	SecurityGroupIDs     wireSGs           `json:"SecurityGroupIds"`
	PrivateIPSets        wirePrivateIPSets `json:"PrivateIpSets"`
	Tags                 wireTags          `json:"Tags"`
	Attachment           *wireAttachment   `json:"Attachment,omitempty"`
	OwnerID              string            `json:"OwnerId"`
	SourceDestCheck      bool              `json:"SourceDestCheck"`
}

type wireENIs struct {
	NetworkInterfaceSet []wireENI `json:"NetworkInterfaceSet"`
}

type describeENIsReply struct {
	NetworkInterfaceSets wireENIs `json:"NetworkInterfaceSets"`
	TotalCount           int      `json:"TotalCount"`
	PageNumber           int      `json:"PageNumber,omitempty"`
	PageSize             int      `json:"PageSize,omitempty"`
	NextToken            string   `json:"NextToken"`
}

type assignReply struct {
	AssignedPrivateIPAddressesSet struct {
		NetworkInterfaceID string `json:"NetworkInterfaceId"`
		PrivateIPSet       struct {
			PrivateIPAddress []string `json:"PrivateIpAddress"`
		} `json:"PrivateIpSet"`
	} `json:"AssignedPrivateIpAddressesSet"`
}

type wireInstanceType struct {
	InstanceTypeID              string  `json:"InstanceTypeId"`
	InstanceTypeFamily          string  `json:"InstanceTypeFamily"`
	CpuCoreCount                int     `json:"CpuCoreCount"`
	MemorySize                  float64 `json:"MemorySize"`
	EniQuantity                 int     `json:"EniQuantity"`
	EniPrivateIPAddressQuantity int     `json:"EniPrivateIpAddressQuantity"`
	EniTotalQuantity            int     `json:"EniTotalQuantity"`
	EniTrunkSupported           bool    `json:"EniTrunkSupported"`
	EniIpv6AddressQuantity      int     `json:"EniIpv6AddressQuantity"`
}

type wireIPList struct {
	IPAddress []string `json:"IpAddress"`
}

type wireVpcAttributes struct {
	VpcID            string     `json:"VpcId"`
	VSwitchID        string     `json:"VSwitchId"`
	PrivateIPAddress wireIPList `json:"PrivateIpAddress"`
}

type wireInstanceENI struct {
	NetworkInterfaceID string            `json:"NetworkInterfaceId"`
	MacAddress         string            `json:"MacAddress"`
	PrimaryIPAddress   string            `json:"PrimaryIpAddress"`
	Type               string            `json:"Type"`
	VSwitchID          string            `json:"VSwitchId"`
	PrivateIPSets      wirePrivateIPSets `json:"PrivateIpSets"`
}

type wireInstance struct {
	InstanceID          string            `json:"InstanceId"`
	InstanceName        string            `json:"InstanceName"`
	HostName            string            `json:"HostName"`
	InstanceType        string            `json:"InstanceType"`
	InstanceTypeFamily  string            `json:"InstanceTypeFamily"`
	InstanceNetworkType string            `json:"InstanceNetworkType"`
	Status              string            `json:"Status"`
	RegionID            string            `json:"RegionId"`
	ZoneID              string            `json:"ZoneId"`
	Cpu                 int               `json:"Cpu"`
	Memory              int               `json:"Memory"`
	CreationTime        string            `json:"CreationTime"`
	VpcAttributes       wireVpcAttributes `json:"VpcAttributes"`
	SecurityGroupIDs    wireSGs           `json:"SecurityGroupIds"`
	NetworkInterfaces   *struct {
		NetworkInterface []wireInstanceENI `json:"NetworkInterface"`
	} `json:"NetworkInterfaces,omitempty"`
}

type wireVSwitch struct {
	VSwitchID               string `json:"VSwitchId"`
	VpcID                   string `json:"VpcId"`
	ZoneID                  string `json:"ZoneId"`
	CidrBlock               string `json:"CidrBlock"`
	Status                  string `json:"Status"`
	AvailableIPAddressCount int64  `json:"AvailableIpAddressCount"`
	VSwitchName             string `json:"VSwitchName"`
	CreationTime            string `json:"CreationTime"`
}

// Parameter helpers.

// listParam collects Name.1, Name.2, ... in index order.
func listParam(p map[string]string, name string) []string {
	type kv struct {
		i int
		v string
	}
	var got []kv
	prefix := name + "."
	for k, v := range p {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		i, err := strconv.Atoi(rest)
		if err != nil {
			continue
		}
		got = append(got, kv{i, v})
	}
	sort.Slice(got, func(a, b int) bool { return got[a].i < got[b].i })
	out := make([]string, 0, len(got))
	for _, g := range got {
		out = append(out, g.v)
	}
	return out
}

// tagParams collects Tag.N.Key / Tag.N.Value pairs in index order.
func tagParams(p map[string]string) []tag {
	idx := map[int]*tag{}
	for k, v := range p {
		rest, ok := strings.CutPrefix(k, "Tag.")
		if !ok {
			continue
		}
		n, field, ok := strings.Cut(rest, ".")
		if !ok {
			continue
		}
		i, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		t := idx[i]
		if t == nil {
			t = &tag{}
			idx[i] = t
		}
		switch field {
		case "Key":
			t.Key = v
		case "Value":
			t.Value = v
		}
	}
	keys := make([]int, 0, len(idx))
	for i := range idx {
		keys = append(keys, i)
	}
	sort.Ints(keys)
	var out []tag
	for _, i := range keys {
		if idx[i].Key != "" {
			out = append(out, *idx[i])
		}
	}
	return out
}

// intParam parses an optional integer parameter within [lo, hi].
func intParam(p map[string]string, name string, def, lo, hi int) (int, *APIError) {
	s, ok := p[name]
	if !ok || s == "" {
		return def, nil
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < lo || v > hi {
		return 0, apiErr(http.StatusBadRequest, "InvalidParameter."+name, "The specified parameter %q=%q is not valid: want an integer in [%d, %d].", name, s, lo, hi)
	}
	return v, nil
}

func required(p map[string]string, names ...string) *APIError {
	for _, n := range names {
		if p[n] == "" {
			return apiErr(http.StatusBadRequest, CodeMissingParameter, "The input parameter %q that is mandatory for processing this request is not supplied.", n)
		}
	}
	return nil
}

// page cuts items by PageNumber/PageSize or, when NextToken or MaxResults is given, by token.
// It returns the window, and the reply's PageNumber, PageSize and NextToken.
type pageWindow struct {
	from, to   int
	pageNumber int
	pageSize   int
	nextToken  string
}

func paginate(p map[string]string, total, defSize, maxSize int) (pageWindow, *APIError) {
	if _, tok := p["NextToken"]; tok || p["MaxResults"] != "" {
		size, aerr := intParam(p, "MaxResults", defSize, 1, maxSize)
		if aerr != nil {
			return pageWindow{}, aerr
		}
		from := 0
		if t := p["NextToken"]; t != "" {
			n, err := strconv.Atoi(strings.TrimPrefix(t, "nt-"))
			if err != nil || !strings.HasPrefix(t, "nt-") || n < 0 || n > total {
				return pageWindow{}, apiErr(http.StatusBadRequest, "InvalidParameter.NextToken", "The specified NextToken %q is not valid: pass the NextToken of the previous page.", t)
			}
			from = n
		}
		to := min(from+size, total)
		w := pageWindow{from: from, to: to}
		if to < total {
			w.nextToken = "nt-" + strconv.Itoa(to)
		}
		return w, nil
	}
	num, aerr := intParam(p, "PageNumber", 1, 1, 1<<30)
	if aerr != nil {
		return pageWindow{}, aerr
	}
	size, aerr := intParam(p, "PageSize", defSize, 1, maxSize)
	if aerr != nil {
		return pageWindow{}, aerr
	}
	from := min((num-1)*size, total)
	return pageWindow{from: from, to: min(from+size, total), pageNumber: num, pageSize: size}, nil
}
